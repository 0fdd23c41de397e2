"""The shared layer of every fine-tuning method; it knows no method (methods register in `hf_deelbo.registry`)."""
