"""Normalising preference rows of every common shape into :class:`PreferenceExample`.

Accepted shapes (column names can be remapped with ``ColumnMap``):

* **standard**: ``prompt``, ``chosen``, ``rejected`` strings, optional ``system`` string
  (truthy-dpo style);
* **conversational**: ``chosen``/``rejected`` (and optional ``prompt``) as lists of
  ``{"role", "content"}`` messages (UltraFeedback-binarized style). A prompt string with message
  completions is read as one user turn. Messages may be tool turns: an assistant message with
  ``tool_calls`` (its content may then be empty or null) and ``{"role": "tool", "content": ...}``
  results; an optional ``tools`` column (JSON function schemas, a list or a JSON string) is
  handed to the chat template;
* **implicit prompt**: no prompt column; ``chosen``/``rejected`` share a prefix (HH-RLHF style).
  The prompt is their longest common prefix, cut at a turn boundary: for messages, whole
  messages before the first assistant turn that differs; for strings, just after the last
  assistant marker (``"\\n\\nAssistant:"`` and friends) in the common prefix, else at the last
  whitespace.

Row problems come back as :class:`BadRow` (reason key + detail) so the caller can stop or skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .io import BadRecord, Record

__all__ = ["ColumnMap", "PreferenceExample", "BadRow", "normalize_record", "extract_string_prompt", "common_prefix_len", "check_messages",
           "as_text", "ASSISTANT_MARKERS", "SHAPES"]

Message = dict[str, Any]
Content = str | list[Message]

# Markers after which an assistant turn starts, most specific first.
ASSISTANT_MARKERS = (
    "\n\nAssistant:",
    "<|im_start|>assistant\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "<|assistant|>\n",
    "[/INST]",
    "### Response:",
    "### Assistant:",
    "\nAssistant:",
    "Assistant:",
)

VALID_ROLES = {"system", "user", "assistant", "tool", "developer"}
# Message keys handed to the chat template (others, e.g. per-message scores, are dropped so that
# two renderings of the same turn compare equal).
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content")
# What a row looked like, as `preftune data inspect` reports it.
SHAPES = ("standard", "conversational", "implicit prompt")


@dataclass(frozen=True)
class ColumnMap:
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    system: str = "system"
    tools: str = "tools"
    completion: str = "completion"  # unpaired (KTO) rows
    label: str = "label"


@dataclass
class PreferenceExample:
    """One pair, normalised. ``prompt`` is a string or a message list (conversational)."""

    prompt: Content
    chosen: Content
    rejected: Content
    system: str | None
    where: str
    example_id: int
    tools: list[dict] | None = None  # JSON function schemas for the chat template
    shape: str = "standard"  # one of SHAPES

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


@dataclass
class BadRow:
    where: str
    reason: str  # short key used for counting ("missing column", "empty field", ...)
    detail: str

    def message(self) -> str:
        return f"{self.where}: {self.reason}: {self.detail}"


def check_messages(value: Any, field: str) -> str | None:
    """Return an error detail if ``value`` is not a valid message list.

    Every message needs a known role and string content; an assistant message that carries
    ``tool_calls`` (a non-empty list of objects) may have empty or null content.
    """
    if not value:
        return f"{field!r} is an empty message list"
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            return f"{field!r} message {j} must be an object with 'role' and 'content'"
        if m["role"] not in VALID_ROLES:
            return f"{field!r} message {j} has unknown role {m['role']!r} (expected one of {', '.join(sorted(VALID_ROLES))})"
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
                return f"{field!r} message {j}: 'tool_calls' must be a non-empty list of objects on an assistant message"
            if m.get("content") is None:
                continue
        elif "content" not in m:
            return f"{field!r} message {j} must be an object with 'role' and 'content'"
        if not isinstance(m["content"], str):
            return f"{field!r} message {j} content must be a string, got {type(m['content']).__name__}"
    return None


def _clean_messages(messages: list[dict]) -> list[Message]:
    """The template-relevant keys of each message (null values dropped; null content of a tool
    call becomes ``""``)."""
    out = []
    for m in messages:
        clean = {k: m[k] for k in MESSAGE_KEYS if m.get(k) is not None}
        clean.setdefault("content", "")
        out.append(clean)
    return out


def _read_tools(value: Any, field: str) -> tuple[list[dict] | None, str | None]:
    """The ``tools`` column as a list of schema objects (a JSON string is parsed), or an error."""
    if value is None or value == "" or value == []:
        return None, None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return None, f"{field!r} is not valid JSON ({e.msg})"
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        return None, f"{field!r} must be a list of JSON function schemas (objects), got {type(value).__name__}"
    return value, None


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two strings or lists.

    One slice comparison settles the common case (one is a prefix of the other); otherwise
    strings bisect on slice equality (memcmp-speed slices) and lists walk the elements (a
    list slice copies its items, so bisection would cost more than it saves)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    if isinstance(a, str):
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if a[:mid] == b[:mid]:
                lo = mid
            else:
                hi = mid - 1
        return lo
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def extract_string_prompt(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt shared by two strings, cut at a turn boundary (0 if none).

    The common prefix is cut just after the last assistant marker it contains; without one,
    at the last whitespace (the prompt keeps the whitespace, as TRL's ``extract_prompt`` does
    not split a word).
    """
    n = common_prefix_len(chosen, rejected)
    if n == len(chosen) and n == len(rejected):
        return n
    common = chosen[:n]
    best = -1
    for marker in ASSISTANT_MARKERS:
        pos = common.rfind(marker)
        if pos >= 0:
            best = max(best, pos + len(marker))
    if best > 0:
        return best
    cut = max(common.rfind(" "), common.rfind("\n"))
    return cut + 1 if cut >= 0 else 0


def as_text(value: Any, field: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, f"{field!r} is missing (null)"
    if not isinstance(value, str):
        return None, f"{field!r} must be a string or a message list, got {type(value).__name__}"
    if not value.strip():
        return None, f"{field!r} is empty"
    return value, None


def normalize_record(record: Record | BadRecord, columns: ColumnMap, example_id: int) -> PreferenceExample | BadRow:
    """Turn one raw row into a :class:`PreferenceExample`, or explain why it is bad."""
    if isinstance(record, BadRecord):
        return BadRow(record.where, record.reason, record.detail)
    row, where = record.row, record.where
    for field in (columns.chosen, columns.rejected):
        if field not in row:
            have = ", ".join(sorted(map(str, row.keys()))) or "none"
            if columns.completion in row and columns.label in row:
                return BadRow(where, "missing column", f"no {field!r} column: this is an unpaired row ({columns.completion!r}, {columns.label!r}); "
                              "train on unpaired data with --method kto")
            return BadRow(where, "missing column", f"no {field!r} column (columns: {have}); map yours with --{'chosen' if field == columns.chosen else 'rejected'}_column")
    chosen, rejected = row[columns.chosen], row[columns.rejected]
    prompt = row.get(columns.prompt)
    system = row.get(columns.system)
    if system is not None and not isinstance(system, str):
        return BadRow(where, "wrong type", f"{columns.system!r} must be a string, got {type(system).__name__}")
    system = system if system and system.strip() else None
    tools, problem = _read_tools(row.get(columns.tools), columns.tools)
    if problem:
        return BadRow(where, "wrong type", problem)

    conversational = isinstance(chosen, list) or isinstance(rejected, list)
    if conversational:
        for field, value in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if isinstance(value, str):
                continue
            if not isinstance(value, list):
                return BadRow(where, "wrong type", f"{field!r} must be a string or a message list, got {type(value).__name__}")
            problem = check_messages(value, field)
            if problem:
                return BadRow(where, "malformed messages", problem)
        chosen = _clean_messages(chosen) if isinstance(chosen, list) else [{"role": "assistant", "content": chosen}]
        rejected = _clean_messages(rejected) if isinstance(rejected, list) else [{"role": "assistant", "content": rejected}]
        shared = common_prefix_len(chosen, rejected)
        if shared == len(chosen) and shared == len(rejected):
            return BadRow(where, "chosen equals rejected", "the chosen and rejected conversations are identical")
        # the shared part must end before the first differing assistant turn
        while shared > 0 and chosen[shared - 1]["role"] == "assistant" and (shared == len(chosen) or shared == len(rejected)):
            shared -= 1
        prompt_msgs = chosen[:shared]
        if prompt is not None:
            if isinstance(prompt, str):
                if not prompt.strip():
                    return BadRow(where, "empty field", f"{columns.prompt!r} is empty")
                explicit = [{"role": "user", "content": prompt}]
            elif isinstance(prompt, list):
                problem = check_messages(prompt, columns.prompt)
                if problem:
                    return BadRow(where, "malformed messages", problem)
                explicit = _clean_messages(prompt)
            else:
                return BadRow(where, "wrong type", f"{columns.prompt!r} must be a string or a message list, got {type(prompt).__name__}")
            # UltraFeedback-binarized repeats the prompt inside chosen/rejected: do not add it twice.
            if not any(m["role"] == "user" and m["content"] == explicit[-1]["content"] for m in prompt_msgs):
                prompt_msgs = explicit + prompt_msgs
        chosen_c, rejected_c = chosen[shared:], rejected[shared:]
        if not prompt_msgs:
            return BadRow(where, "no prompt", "no prompt column and chosen/rejected share no leading messages; add a prompt")
        if not chosen_c or not rejected_c:
            return BadRow(where, "empty field", "chosen or rejected has no turn after the shared prompt")
        if chosen_c[0]["role"] != "assistant" or rejected_c[0]["role"] != "assistant":
            return BadRow(where, "malformed messages", "the completion after the prompt must start with an assistant turn")
        if system and not any(m["role"] == "system" for m in prompt_msgs):
            prompt_msgs = [{"role": "system", "content": system}] + prompt_msgs
        return PreferenceExample(prompt_msgs, chosen_c, rejected_c, system, where, example_id, tools, "conversational")

    chosen, problem = as_text(chosen, columns.chosen)
    if problem:
        return BadRow(where, "empty field" if "empty" in problem else "wrong type" if "must be" in problem else "missing value", problem)
    rejected, problem = as_text(rejected, columns.rejected)
    if problem:
        return BadRow(where, "empty field" if "empty" in problem else "wrong type" if "must be" in problem else "missing value", problem)
    if prompt is None and columns.prompt in row:
        return BadRow(where, "missing value", f"{columns.prompt!r} is null")
    if prompt is None:
        cut = extract_string_prompt(chosen, rejected)
        if cut == 0:
            return BadRow(where, "no prompt", "no prompt column and chosen/rejected share no prefix; add a prompt column or map one with --prompt_column")
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
        if not chosen.strip() or not rejected.strip():
            return BadRow(where, "chosen equals rejected" if chosen == rejected else "empty field", "a completion is empty after removing the shared prompt")
        shape = "implicit prompt"
    else:
        if isinstance(prompt, list):
            problem = check_messages(prompt, columns.prompt)
            if problem:
                return BadRow(where, "malformed messages", problem)
            prompt, shape = _clean_messages(prompt), "conversational"
        else:
            prompt, problem = as_text(prompt, columns.prompt)
            if problem:
                return BadRow(where, "empty field" if "empty" in problem else "wrong type", problem)
            shape = "standard"
    if chosen == rejected:
        return BadRow(where, "chosen equals rejected", "the chosen and rejected answers are identical")
    return PreferenceExample(prompt, chosen, rejected, system, where, example_id, tools, shape)
