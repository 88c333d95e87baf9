"""How the evaluation report words and lays out its numbers: the tie rule, number formatting and
the per-loop markdown table.  Shared by `report` and `ladder` (which `report` imports), so it
imports neither.
"""
from __future__ import annotations

from typing import Any

# A ratio inside [1 − TIE, 1 + TIE] reads as "matches" in the findings.
TIE = 0.05


def fmt(x) -> str:
  """Three significant digits; "n/a" for None (a non-finite value in the report)."""
  return "n/a" if x is None else f"{x:.3g}"


def verdict(ratio: float) -> str:
  """The TIE rule for a model/reference error ratio."""
  return "beats" if ratio < 1 - TIE else ("loses to" if ratio > 1 + TIE else "matches")


def loop_table(r: dict[str, Any], headers: list[str], cells_of) -> list[str]:
  """A markdown table with one row per loop, the trained T in bold; cells_of(j): the row's cells."""
  lines = ["| t | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
  for j, t in enumerate(r["loops"]):
    row = f"| {t} | " + " | ".join(cells_of(j)) + " |"
    lines.append(row.replace("| ", "| **", 1).replace(f"**{t} |", f"**{t}** |")
                 if t == r["trained_loops"] else row)
  return lines
