"""The main job (``hdfunc demo``, ``bash run.sh``) runs and says what the paper says."""

import re

from hdfunc import demo


def test_demo_rules_and_study(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--steps", "60", "--skip-verification", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    losses = {name: float(loss) for name, loss in
              re.findall(r"^(\w+)\s+([0-9.]+)\s+[0-9.e+-]+$", text, flags=re.M)}
    assert set(losses) == {"sgd", "sgd_hd", "sgdn", "sgdn_hd", "adam", "adam_hd"}
    # At α_0 = 1e-3 plain SGD crawls; SGD-HD raises its rate and gets far lower (§4, Fig. 2).
    assert losses["sgd_hd"] < 0.5 * losses["sgd"]
    assert re.search(r"^sgd_hd vs sgd\s+1e-03\s+1e-03\s+8/8", text, flags=re.M)  # α₀, β
    for name in ("steps.csv", "summary.json", "plots/loss.png", "plots/lr.png"):
        assert (out / name).is_file(), name
    # A second run reuses the finished study instead of recomputing it.
    csv_before = (out / "steps.csv").read_text()
    assert demo.main(["--steps", "1", "--skip-verification", "--out", str(out)]) == 0
    assert (out / "steps.csv").read_text() == csv_before
