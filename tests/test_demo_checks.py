"""The demo's checks (toy_tasks.report.verdicts) on hand-made rows: each check flips with the numbers,
and fronts that share no KL are reported as not comparable instead of crashing the summary."""
from toy_tasks.report import along, verdicts


def rows(slerp=0.8, run_end=0.7, final=0.85, plain=0.8, front_last=(0.6, 0.9), front_first=(0.5, 0.8),
         kl_last=(0.1, 1.0), kl_first=(0.1, 1.0)):
    se = 0.01
    out = [{"kind": "eval", "iteration": 0, "label": "theta_sft", "kl": 0.0, "reward": 0.3, "reward_se": se}]
    for it in (1, 2):
        out += [{"kind": "trajectory", "iteration": it, "run": m, "step": 10, "kl": 0.5, "reward": run_end,
                 "reward_se": se} for m in (0, 1)]
        out.append({"kind": "eval", "iteration": it, "label": f"iter {it} SLERP", "kl": 0.6, "reward": slerp,
                    "reward_se": se})
        kls, rewards = (kl_first, front_first) if it == 1 else (kl_last, front_last)
        out += [{"kind": "front", "iteration": it, "kl": k, "reward": r, "reward_se": se}
                for k, r in zip(kls, rewards)]
    out.append({"kind": "trajectory", "iteration": 0, "run": "sft-anchor", "step": 20, "kl": 0.5, "reward": plain,
                "reward_se": se})
    out.append({"kind": "eval", "iteration": 2, "label": "iter 2 LITI (eta=0.3)", "kl": 0.5, "reward": final,
                "reward_se": se, "quality": 0.95})
    return out


def holds(rows_):
    return {name.split(" (")[0]: ok for name, ok, _ in verdicts(rows_)}


def test_checks_hold_and_fail_with_the_numbers():
    good = holds(rows())
    assert all(good.values()), good
    bad = holds(rows(slerp=0.705, final=0.8, front_last=(0.5, 0.8)))
    assert not any(v for k, v in bad.items() if "grammatical" not in k), bad


def test_along_interpolates_and_is_none_outside():
    pts = [{"kl": 0.0, "reward": 0.0, "reward_se": 0.0}, {"kl": 2.0, "reward": 1.0, "reward_se": 0.0}]
    assert along(pts, 0.5)[0] == 0.25
    assert along(pts, 2.5) is None


def test_fronts_without_a_shared_kl_do_not_crash():
    out = verdicts(rows(kl_first=(0.01, 0.02), kl_last=(0.5, 1.0)))
    front = [(ok, numbers) for name, ok, numbers in out if "front" in name]
    assert front == [(False, front[0][1])] and "share no KL" in front[0][1]


def test_reading_states_the_room_left_under_the_optimal_front():
    from toy_tasks.report import reading
    r = rows(final=0.8)
    r += [{"kind": "optimal_front", "kl": 0.5, "reward": 0.9, "trusted": True},
          {"kind": "optimal_front", "kl": 1.0, "reward": 1.0, "trusted": False}]
    text = " ".join(reading(r, verdicts(r)))
    # final model at KL 0.5 -> front 0.9, reward 0.8: gap 0.100; plain RL's end at KL 0.5 with reward 0.8
    assert "final model is 0.100 and plain RL's end 0.100 below" in text
    assert reading(r, [("x", True, "")]) == []          # every check holds: nothing to explain
