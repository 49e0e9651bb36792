"""``preftune merge ADAPTER_DIR --output_dir OUT``: fold a LoRA/DoRA adapter into its base model
(:func:`preftune.merge.merge_adapter`)."""

from __future__ import annotations

from .options import Positional, build_parser, parse_options

__all__ = ["build_merge_parser", "cmd_merge"]


def build_merge_parser():
    from ..config import LoadArguments, MergeArguments

    return build_parser(
        "preftune merge",
        "Merge a LoRA/DoRA adapter (the output_dir of a --use_peft run) into its base model; "
        "writes a full model (safetensors + tokenizer) that plain transformers loads.",
        (MergeArguments, LoadArguments),
        (Positional("adapter_dir", "ADAPTER_DIR", "folder with adapter_config.json and the adapter weights"),),
    )


def cmd_merge(argv: list[str]) -> int:
    from ..merge import merge_adapter

    merge_args, load, where = parse_options(build_merge_parser(), argv, "merge")
    out = merge_adapter(where.adapter_dir, merge_args.output_dir, merge_args.base_model, merge_args.overwrite, load.torch_dtype,
                        load.trust_remote_code, load.chat_template_file)
    print(f"merged {where.adapter_dir} into its base model; wrote {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
