"""`hf-deelbo push`: upload an output directory to the Hub."""

from __future__ import annotations

import os

from .common import ArgumentParser, UsageError, read_deelbo


def _point_card_at_repo(output_dir: str, repo_id: str) -> None:
    """The card of a directory trained without a Hub id loads the local directory; once pushed, it
    loads `repo_id`."""
    from ..hub.model_card import set_card_repo_id

    card_file = os.path.join(output_dir, "README.md")
    if not os.path.isfile(card_file):
        return
    with open(card_file, encoding="utf-8") as f:
        text = f.read()
    pointed = set_card_repo_id(text, repo_id)
    if pointed != text:
        with open(card_file, "w", encoding="utf-8") as f:
            f.write(pointed)


def make_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="hf-deelbo push", description="Upload an output directory to the Hub.", allow_abbrev=False
    )
    parser.add_argument("output_dir", help="Directory written by hf-deelbo train.")
    parser.add_argument("--repo_id", required=True, help="Target repo, 'namespace/name'.")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--commit_message", default="Upload model fine-tuned with DE ELBO")
    return parser


def main(argv: list[str]) -> int:
    from huggingface_hub import HfApi

    parser = make_parser()
    args = parser.parse_args(argv)
    read_deelbo(args.output_dir)  # refuses directories that are not a finished run
    from ..hub.push import HubPushError, check_repo_namespace, hub_call, push_error

    card_file = os.path.join(args.output_dir, "README.md")
    card = open(card_file, "rb").read() if os.path.isfile(card_file) else None
    try:
        with hub_call():  # HF_DEELBO_HUB_TIMEOUT bounds the whole push, retries included
            repo_id = check_repo_namespace(args.repo_id, args.token)
            api = HfApi(token=args.token)
            url = api.create_repo(repo_id, private=args.private, exist_ok=True, repo_type="model")
            _point_card_at_repo(args.output_dir, repo_id)
            api.upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message=args.commit_message,
                revision=args.revision,
                ignore_patterns=["checkpoint-*", "_*", "*.pt", "*.pth", "training_args.bin"],
            )
    except Exception as error:  # noqa: BLE001 - one line, the cause named
        if card is not None:  # a failed push leaves the directory as it was
            with open(card_file, "wb") as f:
                f.write(card)
        if isinstance(error, HubPushError):
            raise UsageError(str(error)) from None
        raise UsageError(str(push_error(error, args.output_dir, args.repo_id))) from None
    print(f"Pushed {args.output_dir} to {url}")
    return 0
