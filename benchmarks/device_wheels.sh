#!/usr/bin/env bash
# The wheels benchmarks/device_check.py needs on the GPU image (Python 3.12, torch 2.11, transformers
# 5.17, accelerate 1.15, huggingface_hub 1.33, timm, peft, scikit-learn; no network there): datasets,
# evaluate and what they need that the image lacks, built for Python 3.12 on x86-64 Linux, into
# wheels/ (git-ignored). pyarrow alone is 54 MB and a call carries at most 64 MiB with the working
# tree, so the wheels travel in two calls to one warm machine (what the first installs stays):
#     run(carry=["wheels/pyarrow"], command="pip install --no-deps wheels/pyarrow/*.whl")
#     run(carry=["wheels/rest"], command="pip install --no-deps wheels/rest/*.whl && PYTHONPATH=. \
#         python benchmarks/device_check.py --device cuda --output_dir $OUT", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d wheels datasets==5.2.0 evaluate pyarrow dill multiprocess xxhash pandas python-dateutil pytz tzdata requests \
    urllib3 charset-normalizer
mkdir -p wheels/pyarrow wheels/rest
mv wheels/pyarrow-*.whl wheels/pyarrow/
mv wheels/*.whl wheels/rest/
du -sh wheels/pyarrow wheels/rest
