"""zaya_lib.pipeline.paper (the 08_report body) and zaya_lib.pipeline.figures.save_figure."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from zaya_lib.pipeline.figures import save_figure  # noqa: E402
from zaya_lib.pipeline.paper import PAPER_TOPICS, claims_by_topic, render_paper_report  # noqa: E402


def _write(run_dir, stem, obj):
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics" / f"{stem}.json").write_text(json.dumps(obj))


def test_missing_notebooks_say_not_run_and_claims_land_in_their_topic(tmp_path):
    _write(tmp_path, "00_overview", {"claims": [
        {"claim": "total params", "paper": "8.4B", "measured": "8.84B", "figure": "p.png"},
        {"claim": "KV vs MHA", "paper": "8x", "measured": 8.0, "figure": "kv.png", "topic": "KV-cache compression"}]})
    _write(tmp_path, "04_midtraining", {"loss": 1.0})  # ran, but stated no claims
    _write(tmp_path, "09_extra", {"claims": [{"claim": "x", "paper": 1, "measured": 2}]})
    t = claims_by_topic(json.loads(json.dumps({p.stem: json.loads(p.read_text())
                                                for p in sorted((tmp_path / "metrics").glob("*.json"))})))
    assert [c.claim for c in t["Architecture numbers"]] == ["total params"]
    assert [c.measured for c in t["KV-cache compression"]] == [8.0]
    assert all(c.measured == "not run (07_markovian_rsa)" for c in t["Markovian RSA scaling and bounded context"])
    assert t["Context and RoPE schedule"][0].measured == "ran (04_midtraining); no claim recorded"
    assert [c.claim for c in t["Other measurements"]] == ["x"]
    assert set(p.title for p in PAPER_TOPICS) <= set(t)


def test_render_paper_report_links_figures_and_lists_stamps(tmp_path):
    _write(tmp_path, "00_overview", {"claims": [{"claim": "KV", "paper": "8x", "measured": "8.0x", "figure": "kv.png"}],
                                     "kv": 8.0})
    (tmp_path / ".stamps").mkdir()
    (tmp_path / ".stamps" / "00.json").write_text(json.dumps({"notebook": "00_overview", "seconds": 3.5,
                                                              "finished": "now", "git_commit": "abc"}))
    text = render_paper_report(tmp_path)
    assert "[kv.png](figures/kv.png)" in text and "| 00_overview | 3.5 | now | abc |" in text
    assert "not run (06_rl_cascade)" in text and "| 00_overview | kv | 8 |" in text


def test_broken_metrics_file_is_named(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "03_pretraining.json").write_text("{oops")
    with pytest.raises(ValueError, match="03_pretraining.json"):
        render_paper_report(tmp_path)


def test_save_figure_writes_png_atomically(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    assert save_figure(fig, tmp_path, "curve") == "curve.png"
    data = (tmp_path / "figures" / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "figures").iterdir()] == ["curve.png"]  # no temp file left
    with pytest.raises(ValueError, match="bare stem"):
        save_figure(fig, tmp_path, "sub/curve.png")
    plt.close(fig)
