"""``preftune report``: the page is rendered by a real browser (headless Chromium) and must show
the decoded curves image and the run's numbers; user text must come out escaped."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from _trained_runs import copy_run, demo_run, mark_finished
from preftune.cli import main

pytestmark = pytest.mark.slow

PROBE = """
<script>
// test probe (added to a copy of the page): what the browser made of the curves image, once the
// page has loaded. Drawing it on a canvas decodes the pixels; count the ones that are not white.
window.addEventListener('load', () => {
  const img = document.getElementById('training-curves');
  const out = document.createElement('pre');
  out.id = 'probe';
  let ink = -1;
  try {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const px = ctx.getImageData(0, 0, c.width, c.height).data;
    ink = 0;
    for (let i = 0; i < px.length; i += 4) if (px[i] < 200 || px[i + 1] < 200 || px[i + 2] < 200) ink++;
  } catch (e) { ink = String(e); }
  out.textContent = JSON.stringify({complete: img.complete, w: img.naturalWidth, h: img.naturalHeight, ink: ink});
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def dump_dom(page: Path) -> str:
    """The DOM after Chromium loaded ``page`` and ran its scripts (--dump-dom)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Cells(HTMLParser):
    """Text of elements carrying data-metric (per table id), element ids seen, <script>/<img> tags."""

    def __init__(self):
        super().__init__()
        self.metric: dict[tuple[str, str], list[str]] = {}
        self.ids: set[str] = set()
        self.scripts = 0
        self.imgs: list[dict] = []
        self.external: list[str] = []
        self._table = ""
        self._open: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "table":
            self._table = a.get("id", "")
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            if a.get(key, "") and not a[key].startswith("data:"):
                self.external.append(a[key])
        if "data-metric" in a and tag in ("td", "div"):
            self._open.append((self._table, a["data-metric"]))
            self.metric.setdefault(self._open[-1], [])

    def handle_endtag(self, tag):
        if tag in ("td", "div") and self._open:
            self._open.pop()

    def handle_data(self, data):
        self.text.append(data)
        for key in self._open:
            self.metric[key].append(data)

    def value(self, table: str, metric: str) -> str:
        return "".join(self.metric[(table, metric)]).strip()


def parse(page_text: str) -> Cells:
    cells = Cells()
    cells.feed(page_text)
    return cells


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A copy of the demo run with eval.json and generations.jsonl written by `preftune eval`."""
    run = copy_run(demo_run(tmp_path_factory), tmp_path_factory.mktemp("report") / "run")
    assert main(["eval", str(run), "--compare", "base", "--generate", "2", "--max_new_tokens", "4", "--max_samples", "16"]) == 0
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_a_browser_with_curves_and_numbers(evaluated_run, capsys):
    (evaluated_run / "training_curves.png").unlink()  # re-rendered from metrics.jsonl
    assert main(["report", str(evaluated_run)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = evaluated_run / "report.html"
    static = parse(page.read_text(encoding="utf-8"))
    assert static.scripts == 0 and static.external == []  # self-contained: nothing to fetch, nothing to run
    width, height = png_size(evaluated_run / "training_curves.png")

    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = dump_dom(probe)
    seen = parse(dom)
    shown = json.loads(_probe_text(dom))
    assert shown["complete"] is True and (shown["w"], shown["h"]) == (width, height) and width > 0
    assert isinstance(shown["ink"], int) and shown["ink"] > 0.01 * width * height  # decoded pixels: axes, lines, text

    final = json.loads((evaluated_run / "run_complete.json").read_text())["final_metrics"]
    for key in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_nll_loss", "loss", "nll_loss"):
        assert seen.value("final-metrics-table", key) == f"{final[key]:.4g}", key
    assert seen.value("run-metrics-table", "train_runtime") == f"{final['train_runtime']:.4g}"
    ev = json.loads((evaluated_run / "eval.json").read_text())
    text = " ".join(seen.text)
    for model in ev["models"]:
        assert model["name"] in text
        assert f"{model['metrics']['rewards/margins']:.4g}" in text
    gens = [json.loads(line) for line in (evaluated_run / "generations.jsonl").read_text().splitlines()]
    assert gens[0]["prompt"] in text and gens[0]["answers"][0]["answer"] in text
    assert {"summary", "curves", "final-metrics", "eval", "generations", "config"} <= seen.ids
    config = json.loads((evaluated_run / "run_config.json").read_text())
    assert config["training"]["method"].upper() in text and str(config["training"]["learning_rate"]) in text


def _probe_text(dom: str) -> str:
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    return dom[start : dom.index("</pre>", start)]


def test_user_text_is_escaped(evaluated_run, tmp_path):
    run = copy_run(evaluated_run, tmp_path / "hostile")
    evil = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
    config = json.loads((run / "run_config.json").read_text())
    config["dataset"] = evil
    config["training"]["method"] = evil
    (run / "run_config.json").write_text(json.dumps(config))
    rows = [{"prompt": evil, "chosen": "a & b", "rejected": "</pre>", "where": evil, "answers": [{"model": evil, "answer": evil}]}]
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mark_finished(run)  # the edited run_config.json is now what the run recorded
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    cells = parse(page)
    assert cells.scripts == 0
    assert [i for i in cells.imgs if i.get("src") == "x"] == []  # no injected <img>
    text = "".join(cells.text)
    assert evil in text and "a & b" in text and "</pre>" in text  # shown literally
    if _chromium():
        dom = dump_dom(run / "report.html")
        assert "pwned" not in dom.split("<title>")[1].split("</title>")[0]


def test_unfinished_run_stale_generations_and_errors(evaluated_run, tmp_path, capsys):
    run = copy_run(evaluated_run, tmp_path / "unfinished")
    ev = json.loads((run / "eval.json").read_text())
    del ev["generations"]  # a later `preftune eval` without --generate: generations.jsonl is stale
    (run / "eval.json").write_text(json.dumps(ev))
    assert main(["report", str(run)]) == 0
    cells = parse((run / "report.html").read_text(encoding="utf-8"))
    assert "eval" in cells.ids and "generations" not in cells.ids

    (run / "run_complete.json").unlink()
    (run / "eval.json").unlink()
    (run / "generations.jsonl").unlink()
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(run), "--output", str(out)]) == 0
    cells = parse(out.read_text(encoding="utf-8"))
    assert "unfinished" in cells.ids and "eval" not in cells.ids and "generations" not in cells.ids
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss"] for r in last if "loss" in r][-1]
    assert cells.value("final-metrics-table", "loss") == f"{last_loss:.4g}"
    capsys.readouterr()

    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "kernels-community" not in line]
    assert len(err) == 2 and all(line.startswith("preftune: error: ") for line in err)
    assert "not found" in err[0] and "not a run folder" in err[1]


def _cards(page: str) -> dict[str, str]:
    """The headline cards: metric key -> the title shown beside the number."""
    import re

    return dict(re.findall(r'<div class="card" data-metric="([^"]+)"><div class="v">[^<]*</div><div class="k">(.*?) <code>', page))


def _written_run(folder: Path, final: dict, records: list[dict]) -> Path:
    """A finished run folder as `preftune train` leaves it (records only: the report reads no model)."""
    from preftune.saving import finish_run

    folder.mkdir()
    config = {"training": {"method": "orpo", "learning_rate": 1e-4}, "model": {}, "data": {}, "base_model": "tiny", "dataset": "prefs.jsonl",
              "train_pairs": 16, "eval_pairs": 0, "demo": False}
    (folder / "run_config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    finish_run(folder, {"final_metrics": final, "seconds": 42.0, "demo": False}, [])
    return folder


def test_a_run_without_eval_split_labels_its_training_metrics_as_training(tmp_path):
    """No eval split: the headline numbers are the last logged training values and say so; nothing is called eval."""
    last = {"step": 4, "epoch": 1.0, "loss": 0.61, "nll_loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.02, "log_odds_chosen": 0.3}
    final = {**{k: v for k, v in last.items() if k not in ("step", "epoch")}, "train_runtime": 12.5, "train_loss": 0.65}
    run = _written_run(tmp_path / "run", final, [last, {"step": 4, "epoch": 1.0, "train_runtime": 12.5, "train_loss": 0.65}])
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    cards = _cards(page)
    assert cards == {"rewards/accuracies": "reward accuracy (training, last log)", "rewards/margins": "reward margin (training, last log)",
                     "loss": "loss (training, last log)", "nll_loss": "chosen NLL (training, last log)",
                     "log_odds_chosen": "log odds (chosen) (training, last log)", "train_runtime": "training time"}
    table = page[page.index('<table id="final-metrics-table">'):]
    table = table[: table.index("</table>")]
    assert "<th>eval</th>" not in table and "<th>training, last log</th>" in table
    assert "eval" not in " ".join(cards.values())


def test_a_run_with_eval_and_a_resumed_run_name_their_numbers(tmp_path):
    final = {"loss": 0.5, "rewards/accuracies": 0.7, "eval_rewards/accuracies": 0.6, "eval_loss": 0.55, "train_runtime": 5.0,
             "total_train_runtime": 17.0}
    run = _written_run(tmp_path / "run", final, [{"step": 2, "loss": 0.5, "rewards/accuracies": 0.7}])
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text(encoding="utf-8")
    cards = _cards(page)
    assert cards["eval_rewards/accuracies"] == "eval reward accuracy" and "rewards/accuracies" not in cards
    assert cards["total_train_runtime"] == "training time, all segments (resumed run)" and "train_runtime" not in cards
    assert "finished in 42 s after a resume (17 s of training over all its segments)" in page
    assert "<th>eval</th>" in page
