"""The training and held-out examples of a run, and their tokenized pairs: one path for
``preftune train`` and ``preftune eval`` (which rebuilds the split a run held out)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import PreftuneError
from . import ColumnMap, LoadedData, load_examples, split_eval
from .tokenize import TokenizeSettings, tokenize_examples
from .unpaired import tokenize_unpaired

logger = logging.getLogger(__name__)

__all__ = ["EVAL_ID_OFFSET", "columns_of", "tokenize_settings_of", "load_train_eval", "tokenize_split"]

# Example ids of a separate eval split start here, so train and eval ids never collide (the
# precomputed reference table is keyed by example id).
EVAL_ID_OFFSET = 10**9


def columns_of(data_args) -> ColumnMap:
    """The column mapping named by a :class:`preftune.config.DataArguments`."""
    return ColumnMap(data_args.prompt_column, data_args.chosen_column, data_args.rejected_column, data_args.system_column,
                     data_args.completion_column, data_args.label_column)


def tokenize_settings_of(data_args) -> TokenizeSettings:
    """The tokenization settings named by a :class:`preftune.config.DataArguments`."""
    return TokenizeSettings(
        max_length=data_args.max_length,
        max_prompt_length=data_args.max_prompt_length,
        truncation_mode=data_args.truncation_mode,
        chat_template=data_args.chat_template,
    )


def load_train_eval(data_args, seed: int, unpaired: bool = False) -> tuple[list, list, LoadedData]:
    """Training and held-out examples exactly as a run splits them.

    ``--eval_fraction`` holds out a seeded random fraction of the training data;
    ``--eval_split`` reads a split of the same dataset, or a file. Returns ``(train, eval,
    loaded)`` where ``loaded`` describes the training source (skipped rows by reason).
    ``unpaired`` (KTO): unpaired rows are read as :class:`preftune.data.UnpairedExample`; pairs
    stay pairs here (split into labelled completions at tokenization, after the eval split, so a
    pair's two halves never land on both sides).
    """
    loaded = load_examples(
        data_args.dataset_name, data_args.dataset_split, columns_of(data_args), data_args.on_bad_row, data_args.dataset_format, unpaired=unpaired
    )
    if loaded.skipped:
        logger.warning("%s: %s", data_args.dataset_name, loaded.skip_summary())
    train = loaded.examples
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    evals: list = []
    if data_args.eval_fraction:
        train, evals = split_eval(train, data_args.eval_fraction, seed)
    elif data_args.eval_split:
        is_path = Path(data_args.eval_split).expanduser().exists()
        source = data_args.eval_split if is_path else data_args.dataset_name
        split = "train" if is_path else data_args.eval_split
        held = load_examples(source, split, columns_of(data_args), data_args.on_bad_row, data_args.dataset_format, id_offset=EVAL_ID_OFFSET,
                             unpaired=unpaired)
        evals = held.examples
    return train, evals, loaded


def tokenize_split(tokenizer, examples: list, settings: TokenizeSettings, label: str, unpaired: bool = False, kl_group: int | None = None):
    """Tokenized pairs of ``examples`` whose failures name ``label`` (e.g. "train data") in one line.

    ``unpaired``: labelled examples instead (:func:`preftune.data.unpaired.tokenize_unpaired`;
    pairs are split first), each with a KL completion from its group of ``kl_group`` (None: none).
    Logs the tokenization summary; raises when every example of a non-empty split was dropped, or
    when one example is left where KL completions need two. Returns ``(pairs, report)``.
    """
    try:
        if unpaired:
            pairs, report = tokenize_unpaired(tokenizer, examples, settings, kl_group)
        else:
            pairs, report = tokenize_examples(tokenizer, examples, settings)
    except ValueError as e:
        raise PreftuneError(f"{label}: {e}") from None
    logger.info("%s: %s", label, report.summary())
    if not pairs and examples:
        raise PreftuneError(f"{label}: every example was dropped during tokenization ({report.summary()}); raise --max_length")
    if kl_group is not None and len(pairs) == 1:
        raise PreftuneError(f"{label}: one example left after tokenization; the KL term needs at least two (each example is scored "
                            "with another example's completion)")
    return pairs, report
