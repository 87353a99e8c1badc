"""trainer/sweep/report.py: the sweep report of a synthetic sweep (tests/sweep/synthetic.py), written through
storage (a file:// directory and a real S3 endpoint on loopback) and looked at in headless Chromium the way a
person sees it: the pictures load, the grid has a row per cell, the ratio is there beside the reference's.
Stored text (the definition, cell names and statuses) is shown as text, never as markup.

Run: .venv/bin/pytest tests/sweep/test_sweep_report.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sweep import synthetic as S
from trainer.sweep.fit import fit_sweep
from trainer.sweep.report import write_report

ARTIFACTS = Path(__file__).parents[1] / "artifacts"
GRID = {c: list(range(8, 22, 2)) for c in S.REFERENCE_BUDGETS}  # nanochat's grid shape: d8-d20 at every budget
DEFINITION = {"name": "chinchilla-ish", "budgets": list(S.REFERENCE_BUDGETS), "depths": list(range(8, 22, 2)),
              "gpus": 8, "gpu_type": "H100"}
PICTURES = ("isoflop.png", "frontier.png", "law.png")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep's cells (plus one failed and one queued), its fit, and the report written to file://."""
    done = S.cells(GRID, noise=2e-3, seed=3, status="done")
    for i, c in enumerate(done):
        c["cost_usd"], c["core"] = 12.5 + i, 0.05 + i / 1000
    cells = done + [{"cell": "c1e+19-d22", "flops": 1e19, "depth": 22, "status": "failed", "cost_usd": 3.0},
                    {"cell": "c1e+19-d24", "flops": 1e19, "depth": 24, "status": "queued"}]
    fit = fit_sweep(done, n_boot=100)
    root = tmp_path_factory.mktemp("sweeps") / "chinchilla-ish"
    urls = write_report(f"file://{root}", DEFINITION, cells, fit)
    return root, cells, fit, urls


def test_sweep_report_writes_the_pictures_and_the_pages(sweep):
    from PIL import Image

    root, cells, fit, urls = sweep
    assert urls == [f"file://{root}/{n}" for n in PICTURES + ("report.md", "report.html")]
    for name in PICTURES:
        with Image.open(root / name) as im:
            assert im.format == "PNG" and im.size[0] >= 700 and im.size[1] >= 380, (name, im.size)
    md = (root / "report.md").read_text()
    for c in cells:  # one grid row per cell, whatever its state
        assert f"| {c['cell']} | {c['depth']} | {c['flops']:.3g} |" in md
    assert md.count("| done |") == len(GRID) * 7 and "| failed |" in md and "| queued |" in md
    assert f"{len(cells)} cells, {len(cells) - 2} done; ${sum(c.get('cost_usd', 0) for c in cells):,.2f}" in md
    r, a = fit["ratio"], fit["n_opt"]
    assert f"**tokens:params = {r['value']:.1f}** (95% CI {r['ci95'][0]:.1f}–{r['ci95'][1]:.1f})" in md
    assert f"**N_opt = {a['coef']:.3g} · C^{a['exponent']:.3f}** (95% CI {a['ci95'][0]:.3f}–" in md
    assert "The recipe trains at 12" in md and "found 11.2, 10.7, 10.8, 10.3 at 1e+18" in md  # the reference's
    assert "### Parametric law" in md and f"{fit['parametric']['alpha']:.3f}" in md
    html = (root / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3 and "Content-Security-Policy" in html
    for ref in ("http://", "https://", "<script", "<link", 'src="isoflop.png"'):
        assert ref not in html, ref


def test_sweep_report_in_headless_chromium(sweep, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    from tests.tools import chromium_webdriver

    root, cells, fit, _ = sweep
    with chromium_webdriver(tmp_path / "profile", window=(1200, 1600)) as browser:
        browser.get((root / "report.html").as_uri())
        # WebDriver's scripts run from outside the page: its CSP (script-src 'none') stops the page's own only.
        images = browser.execute_script(
            "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt]);")
        assert len(images) == 3, images
        for complete, width, height, alt in images:
            assert complete and width >= 700 and height >= 380, (alt, width, height)  # decoded, not a broken icon
        grid, per_budget = browser.find_elements(By.TAG_NAME, "table")[:2]
        rows = grid.find_elements(By.TAG_NAME, "tr")
        assert len(rows) == len(cells) + 1 and "status" in rows[0].text
        assert [r.find_elements(By.TAG_NAME, "td")[-1].text for r in rows[1:]].count("failed") == 1
        assert len(per_budget.find_elements(By.TAG_NAME, "tr")) == len(fit["budgets"]) + 1
        text = browser.find_element(By.TAG_NAME, "body").text
        assert f"tokens:params = {fit['ratio']['value']:.1f}" in text and "The recipe trains at 12" in text
        assert browser.title == "Sweep report: chinchilla-ish"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "sweep_report.png"
        browser.execute_script("document.querySelectorAll('table')[1].scrollIntoView();")  # the fit, then pictures
        browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the screenshot is (nearly) one colour: nothing rendered"


PAYLOAD = "<script>document.title='pwned'</script>"


def test_hostile_sweep_text_is_shown_as_text(sweep, tmp_path):
    _, cells, fit, _ = sweep
    esc = "\x1b]0;retitled\x07\x1b[2J"
    definition = {"name": f"$\\sqrt{{x}}$ {PAYLOAD}{esc}", "note": f"[click](javascript:alert(1)){esc}",
                  "depths": [PAYLOAD, 10]}
    evil = [dict(c) for c in cells]
    evil[0]["status"] = f'<img src=x onerror="alert(1)">{esc}'
    evil[-1]["cell"] = f"| {PAYLOAD} |"
    evil[-1]["core"] = "![t](https://evil.example/t.png)"
    write_report(f"file://{tmp_path}", definition, evil, dict(fit, parametric=None))  # 2 pictures: the titles
    md, html = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    for page in (md, html):
        assert "\x1b" not in page and "\x07" not in page
    assert "<script" not in html and "<img src=x" not in html and "javascript:" not in html.split("</head>")[1] \
        .replace("[click](javascript:", "")
    assert "&lt;script&gt;document.title=" in html and "https://evil.example" not in html.replace(
        "![t](https://evil.example/t.png)", "")
    assert html.count("<img") == 2 and "<title>Sweep report: $\\sqrt{x}$ &lt;script&gt;" in html


def test_sweep_report_without_a_fit_shows_the_grid_and_why(tmp_path):
    cells = S.cells({1e18: [10, 12]}, status="done")
    urls = write_report(f"file://{tmp_path}", DEFINITION, cells, None,
                        fit_error="2 distinct depth(s) (d10, d12); a parabola needs 3")
    assert urls == [f"file://{tmp_path}/report.md", f"file://{tmp_path}/report.html"]
    md = (tmp_path / "report.md").read_text()
    assert "No fit yet: 2 distinct depth(s) (d10, d12); a parabola needs 3" in md and "| c1e+18-d12 | 12 |" in md


def test_sweep_report_on_s3(sweep, s3_server):
    """Through storage to a real S3 endpoint (the pages only: the pictures take the same door, write_pngs)."""
    _, cells, _, _ = sweep
    url = f"{s3_server.bucket('sweep-report')}/sweeps/chinchilla-ish"
    urls = write_report(url, DEFINITION, cells, None, fit_error="not yet", storage_options=s3_server.storage_options)
    fs = s3_server.fs()
    assert urls == [f"{url}/report.md", f"{url}/report.html"] and all(fs.exists(u[len("s3://"):]) for u in urls)
    assert fs.cat(f"{url[len('s3://'):]}/report.md").decode().startswith("# Sweep report: chinchilla-ish")
