"""The tokenized cache and the flat pair store.

* a second run with the same inputs reads the cache; a change to the data file's content, the
  tokenizer, the chat template, the template mode, EOS appending, the columns or the format
  invalidates it; truncation settings re-use it;
* equivalence: pairs read from the cache (any truncation, one or two tokenizing processes) are
  exactly the pairs of the plain in-memory path (:func:`tokenize_examples`);
* :class:`TokenizedPairs`: lengths, digest (order-independent), subset/concat, pickling.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from preftune.data import ColumnMap, load_examples
from preftune.data.cache import tokenized_source
from preftune.data.store import TokenizedPairs
from preftune.data.tokenize import TokenizeSettings, tokenize_examples
from preftune.layout import PairTokens

from test_chat_templates import family_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def mixed_rows(n=40):
    """Standard, implicit-prompt and conversational rows, a system column, and two bad rows."""
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            rows.append({"prompt": f"What is {i} plus one?", "chosen": f" The answer is {i + 1}.", "rejected": f" The answer is {i + 2}.",
                         "system": "Be brief." if i % 2 else None})
        elif kind == 1:
            rows.append({"chosen": f"\n\nHuman: count to {i}\n\nAssistant: 1 to {i}", "rejected": f"\n\nHuman: count to {i}\n\nAssistant: no"})
        else:
            user = {"role": "user", "content": f"Name the number {i} " + "again " * (i % 7)}
            rows.append({"chosen": [user, {"role": "assistant", "content": f"It is {i}."}],
                         "rejected": [user, {"role": "assistant", "content": "I do not know the weather."}]})
    rows[5] = {"prompt": "p", "chosen": "", "rejected": "r"}
    rows.insert(9, "{not json")
    return rows


def as_tuples(pairs):
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


def cached_pairs(src, settings):
    """The training path's cut of one whole source (what prepare_data does for it)."""
    from preftune.data.splits import LoadedSource, Selection, pairs_of
    from preftune.data.mixture import DatasetSpec
    from preftune.data.tokenize import TokenizeReport

    n = src.summary.examples
    report = TokenizeReport()
    pairs = pairs_of(Selection(np.zeros(n, dtype=np.int16), np.arange(n)), [LoadedSource(DatasetSpec("x"), src, 0)], settings, report)
    return pairs, report


@pytest.mark.parametrize("settings, exercised", [
    (TokenizeSettings(max_length=None, max_prompt_length=None), None),
    (TokenizeSettings(max_length=24, max_prompt_length=12, truncation_mode="keep_end"), "prompt_truncated"),
    (TokenizeSettings(max_length=20, max_prompt_length=16, truncation_mode="keep_start"), "chosen equals rejected after truncation"),
    (TokenizeSettings(max_length=40, max_prompt_length=None), "no room for the completion (prompt fills max_length)"),
], ids=["untruncated", "keep_end", "keep_start", "no_prompt_cap"])
def test_cached_pairs_equal_plain_tokenization(tmp_path, settings, exercised):
    tok = family_tokenizer("qwen2.5")
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed_rows())
    src = tokenized_source(tok, str(path), settings=settings, cache_dir=tmp_path / "cache")
    pairs, report = cached_pairs(src, settings)
    plain, plain_report = tokenize_examples(tok, load_examples(str(path), on_bad_row="skip").examples, settings)
    assert as_tuples(pairs) == as_tuples(plain) and len(plain) > 10
    assert [p.example_id for p in pairs] == [p.example_id for p in plain]
    assert (report.prompt_truncated, report.completion_truncated, dict(report.dropped)) == \
           (plain_report.prompt_truncated, plain_report.completion_truncated, dict(plain_report.dropped))
    assert src.summary.bad == {"empty field": 1, "malformed JSON": 1}
    # i % 3 over 40 rows: 14 standard, 13 implicit, 13 conversational; row 5 (conversational) is the bad one
    assert src.summary.shapes == {"standard": 14, "implicit prompt": 13, "conversational": 12}
    assert np.array_equal(pairs.lengths(), [p.packed_length for p in plain])
    if exercised:  # the case really cuts or drops something
        assert getattr(report, exercised, 0) or report.dropped[exercised]


def test_two_tokenizing_processes_give_the_same_store(tmp_path):
    tok = family_tokenizer("qwen2.5")
    path = write_jsonl(tmp_path / "mixed.jsonl", mixed_rows(60))
    one = tokenized_source(tok, str(path), cache_dir=tmp_path / "c1", num_proc=1)
    two = tokenized_source(tok, str(path), cache_dir=tmp_path / "c2", num_proc=2)
    assert one.fingerprint == two.fingerprint  # the number of processes is not part of the key
    settings = TokenizeSettings(max_length=None, max_prompt_length=None)
    assert as_tuples(cached_pairs(one, settings)[0]) == as_tuples(cached_pairs(two, settings)[0])
    assert one.summary == two.summary


def test_second_run_reads_the_cache_and_every_input_invalidates_it(tmp_path):
    tok = family_tokenizer("qwen2.5")
    path = write_jsonl(tmp_path / "d.jsonl", mixed_rows())
    cache = tmp_path / "cache"
    first = tokenized_source(tok, str(path), cache_dir=cache)
    again = tokenized_source(tok, str(path), cache_dir=cache)
    assert not first.from_cache and again.from_cache and again.fingerprint == first.fingerprint
    assert again.store.key == first.fingerprint and np.array_equal(again.store.offsets, first.store.offsets)
    # truncation is applied on read: another max_length re-uses the entry
    assert tokenized_source(tok, str(path), settings=TokenizeSettings(max_length=16, max_prompt_length=8), cache_dir=cache).from_cache

    def changed(**kw):
        args = dict(tokenizer=tok, name=str(path), columns=ColumnMap(), dataset_format="auto", settings=TokenizeSettings(), cache_dir=cache)
        args.update(kw)
        result = tokenized_source(**args)
        assert not result.from_cache and result.fingerprint != first.fingerprint
        return result

    rows = mixed_rows()
    rows[0]["chosen"] = " 2!"  # one character of the file
    write_jsonl(path, rows)
    changed()
    write_jsonl(path, mixed_rows())
    assert tokenized_source(tok, str(path), cache_dir=cache).from_cache  # same content again: same entry
    other_template = family_tokenizer("qwen2.5")
    other_template.chat_template = other_template.chat_template.replace("You are Qwen", "You are Qwen!")
    changed(tokenizer=other_template)
    changed(tokenizer=family_tokenizer("llama3"))  # another vocabulary and special tokens
    changed(settings=TokenizeSettings(chat_template="always"))
    changed(settings=TokenizeSettings(add_eos=False))
    changed(columns=ColumnMap(system="sys"))
    changed(dataset_format="truthfulqa")


def test_cache_entry_is_complete_or_absent(tmp_path):
    tok = family_tokenizer("qwen2.5")
    path = write_jsonl(tmp_path / "d.jsonl", mixed_rows(10))
    cache = tmp_path / "cache"
    src = tokenized_source(tok, str(path), cache_dir=cache)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [src.fingerprint]  # no temporary folder left behind
    assert not (entries[0] / "scratch").exists()
    # a half-written entry (no summary.json: the last file written) is rebuilt, not read
    (entries[0] / "summary.json").unlink()
    assert not tokenized_source(tok, str(path), cache_dir=cache).from_cache


def test_file_hash_is_remembered_by_stat_and_any_write_is_seen(tmp_path, monkeypatch):
    import os

    from preftune.data import fingerprint

    path = write_jsonl(tmp_path / "d.jsonl", mixed_rows(6))
    old = os.stat(path).st_mtime - 60
    os.utime(path, (old, old))  # written a minute ago: past the racy window
    reads = []
    real = fingerprint._hash_files
    monkeypatch.setattr(fingerprint, "_hash_files", lambda paths, root=None: reads.append(paths) or real(paths, root))
    first = fingerprint.file_content_hash(path, tmp_path / "cache")
    assert fingerprint.file_content_hash(path, tmp_path / "cache") == first and len(reads) == 1  # remembered
    # same size and the same mtime put back, other bytes: the ctime still moves, so it is read again
    path.write_text(path.read_text().replace("plus", "PLUS"))
    os.utime(path, (old, old))
    changed = fingerprint.file_content_hash(path, tmp_path / "cache")
    assert changed != first and len(reads) == 2
    # a file written just now is hashed every time (a second write in the same clock tick would not show)
    fresh = write_jsonl(tmp_path / "fresh.jsonl", mixed_rows(8))
    fingerprint.file_content_hash(fresh, tmp_path / "cache")
    fingerprint.file_content_hash(fresh, tmp_path / "cache")
    assert len(reads) == 4


def test_tokenized_pairs_views_digest_and_pickling(tmp_path):
    tok = family_tokenizer("qwen2.5")
    path = write_jsonl(tmp_path / "d.jsonl", mixed_rows(30))
    src = tokenized_source(tok, str(path), cache_dir=tmp_path / "cache")
    pairs, _ = cached_pairs(src, TokenizeSettings(max_length=None, max_prompt_length=None))
    # the store on disk reads the same after pickling (DataLoader workers)
    copy = pickle.loads(pickle.dumps(pairs))
    assert as_tuples(copy) == as_tuples(pairs)
    assert pairs[-1] == pairs[len(pairs) - 1] and pairs[2:4] == [pairs[2], pairs[3]]
    with pytest.raises(IndexError):
        pairs[len(pairs)]
    # digest: order-independent, changes with any token or id
    listed = list(pairs)
    a = TokenizedPairs.from_pairs(listed)
    b = TokenizedPairs.from_pairs(listed[::-1])
    assert a.digest() == b.digest() and as_tuples(b) == as_tuples(listed[::-1])
    edited = listed[:1] + [PairTokens(listed[1].prompt, listed[1].chosen[:-1] + [listed[1].chosen[-1] + 1], listed[1].rejected, listed[1].example_id)] + listed[2:]
    assert TokenizedPairs.from_pairs(edited).digest() != a.digest()
    assert pairs.subset(np.arange(len(pairs))[::-1]).digest() == pairs.digest()
    assert pairs.subset([0, 1]).digest() != pairs.digest()
    both = TokenizedPairs.concat([pairs.subset([0, 1]), a.subset([5])])
    assert as_tuples(both) == as_tuples([pairs[0], pairs[1], a[5]]) and len(both.stores) == 2
    assert np.array_equal(both.lengths(), [p.packed_length for p in both])
