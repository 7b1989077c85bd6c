import pytest

from nash.config import ConfigError, EvalSection, load_config
from nash.report import format_table, plot, promotion, table_rows, warnings_for


def head(i, **kw):
    return {"iteration": i, "against": "iter_000", "n": 64, "win_rate": 0.6, "win_rate_se": 0.05,
            "lc_win_rate": 0.55, "failed": 0, "mean_length": 40.0, "pass_rate": 0.3, "kl_from_initial": 0.1,
            "perplexity": 20.0, "promoted": True, **kw}


def test_promotion_against_best_previous_and_a_number():
    earlier = [head(1, win_rate=0.6, kl_from_initial=0.05), head(2, win_rate=0.7, kl_from_initial=0.2)]
    now = head(3, win_rate=0.65, kl_from_initial=0.1)
    assert promotion(now, earlier, ["win_rate >= best"])["promoted"] is False  # best so far 0.7
    assert promotion(now, earlier, ["win_rate >= 0.6", "kl_from_initial <= previous"])["promoted"] is True
    # For KL, lower is better: "best" is the smallest earlier KL.
    check = promotion(now, earlier, ["kl_from_initial <= best"])["checks"][-1]
    assert (check["target"], check["ok"]) == (0.05, False)
    # The first iteration has nothing to beat; a missing metric fails its condition.
    assert promotion(head(1), [], ["win_rate >= best"])["promoted"] is True
    assert promotion(head(2, lc_win_rate=None), [head(1)], ["lc_win_rate >= 0.5"])["promoted"] is False
    assert promotion(now, earlier, [])["promoted"] is True


def test_default_gate_refuses_a_degenerate_iteration_and_one_with_no_annotation():
    cfg = EvalSection()
    clean = head(1, degenerate=0.10, initial_degenerate=0.08, degenerate_rise=0.02)
    assert promotion(clean, [], cfg.promote_if)["promoted"] is True
    # The rules-only demo's iteration 2: a higher win rate, most answers degenerate.
    gamed = head(2, win_rate=0.82, degenerate=0.73, initial_degenerate=0.20, degenerate_rise=0.53)
    result = promotion(gamed, [clean], cfg.promote_if)
    assert result["promoted"] is False and result["checks"][-1]["condition"] == "degenerate_rise <= 0.05"
    # 64 of 64 annotations failed: no win rate, not promoted even with no conditions at all.
    blind = head(3, n=0, win_rate=None, failed=64)
    assert promotion(blind, [clean], [])["promoted"] is False
    assert "no usable annotation" in warnings_for(blind, [clean], cfg)[0]


def test_warnings_on_degeneration_length_and_an_update_that_did_not_move():
    cfg = EvalSection()
    got = warnings_for(head(1, degenerate=0.5, initial_degenerate=0.2, length_ratio=0.4), [], cfg)
    assert len(got) == 2 and "rose from 0.200 for π_0 to 0.500" in got[0] and "0.40x π_0's" in got[1]
    still = {"last_step_loss": 0.6931, "kl_from_parent": 0.0, "steps": 1}
    assert "did not move the policy" in warnings_for(head(1), [], cfg, still)[0]
    assert warnings_for(head(1), [], cfg, {"last_step_loss": 0.61, "kl_from_parent": 0.02}) == []


def test_bad_condition_names_the_key():
    with pytest.raises(ConfigError, match=r"eval\.promote_if: cannot read 'winrate >= best'"):
        load_config(None, ["eval.promote_if=[winrate >= best]"])


def test_warnings_on_a_win_rate_fall_and_a_drift_jump():
    cfg = EvalSection()
    prev = head(1, win_rate=0.70, kl_from_initial=0.05)
    got = warnings_for(head(2, win_rate=0.60, kl_from_initial=0.12), [prev], cfg)
    assert len(got) == 2 and "win rate fell from 0.700 to 0.600" in got[0] and "KL from π_0 jumped" in got[1]
    assert warnings_for(head(2, win_rate=0.67, kl_from_initial=0.09), [prev], cfg) == []
    assert warnings_for(head(1), [], cfg) == []


def test_table_and_plot_show_every_iteration(tmp_path):
    heads = [head(1), head(2, win_rate=None, win_rate_se=None, promoted=False), head(3)]
    rows = table_rows(heads)
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert rows[0]["win rate"] == "0.600 ± 0.050" and rows[1]["win rate"] == "-" and rows[1]["promoted"] == "no"
    text = format_table(rows)
    assert len(text.splitlines()) == 4 and "LC win rate" in text
    out = plot(heads, tmp_path / "p.png", title="t")
    from matplotlib.image import imread

    assert out.read_bytes()[:4] == b"\x89PNG" and imread(out).shape[1] > 500
