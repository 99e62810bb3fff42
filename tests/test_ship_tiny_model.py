"""tools/ship_tiny_model.py's TRAINING.md: a chain resumed from the shipped model keeps the
earlier stages' rows, each with the commit it ran at (also from the older six-column table)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.ship_tiny_model import training_md  # noqa: E402
from tools.train_tiny_chain import STAGES  # noqa: E402


def test_resumed_chain_keeps_each_stage_commit(tmp_path):
  names = [name for name, *_ in STAGES]
  old = ["# The built-in tiny model", "", "Trained ... at commit abc1234, then packed by ...", "",
         "| stage | config | what it trains | steps | minutes | final loss |", "|---|---|---|---|---|---|"]
  old += [f"| {n} | `c.yaml` | w | 10 | 2.0 | 0.1000 |" for n in names[:-1]]
  (tmp_path / "OLD.md").write_text("\n".join(old) + "\n")
  run = tmp_path / "runs" / names[-1]
  run.mkdir(parents=True)
  with open(run / "metrics.jsonl", "w") as f:
    for step in (10, 20):
      f.write(json.dumps({"step": step, "loss": 0.5, "time": 100.0 + 6 * step, "step_s": 6.0}) + "\n")
  md = training_md(str(tmp_path / "runs"), "new5678", str(tmp_path / "OLD.md"))
  rows = {line.split("|")[1].strip(): line for line in md.splitlines()
          if line.startswith("| ") and not line.startswith("| stage")}
  assert set(rows) == set(names)
  for n in names[:-1]:
    assert rows[n].endswith("| abc1234 |"), rows[n]          # carried over with its own commit
  # minutes: first step start (160 - 6 s) to the last line (220 s) = 1.1
  assert rows[names[-1]].endswith("| 20 | 1.1 | 0.5000 | new5678 |"), rows[names[-1]]
  assert "at commit new5678" in md
  # Shipping again from that file keeps the carried commits (seven-column rows stay as they are).
  (tmp_path / "MID.md").write_text(md)
  again = training_md(str(tmp_path / "runs"), "zzz9999", str(tmp_path / "MID.md"))
  assert f"| {names[0]} | `c.yaml` | w | 10 | 2.0 | 0.1000 | abc1234 |" in again
