"""Named tree templates (data only).

Each is a list of rank paths (see trees.py); `none` drafts nothing (plain decoding on the same
runner).

- tr2: the two most likely next tokens, no deeper guess: for runners whose cost grows quickly
  with the tree (int4 weights on a CPU).
- tr4, tr8, tr16, tr32: the best trees of their size for measured acceptance rates
  (`trees.best_template`), from `scripts/calibrate_trees.py --dtype bfloat16` on SmolLM2-135M with
  a hot table and the calibration prompts shipped in tokenrecycle/data (not benchmark prompts).
- tr48, tr80: grown with `trees.grow_template` from an assumed acceptance of 0.45, 0.15, 0.08,
  0.05, 0.035, 0.025, 0.02, 0.015 for ranks 0..7 and the per-depth counts given; tr80 has the
  per-depth counts of the official Token Recycling tree (8/21/25/15/8/3, 80 nodes, depth 6).
"""

from .structure import RankPath

TEMPLATES: dict[str, list[RankPath]] = {
    "none": [],
    # 2 nodes, depth 1
    "tr2": [(0,), (1,)],
    # 4 nodes, per depth 2/1/1; calibrated (expected 0.74 accepted drafts per step)
    "tr4": [
        (0,), (1,), (0, 0), (0, 0, 0),
    ],
    # 8 nodes, per depth 4/2/1/1; calibrated (expected 0.92 accepted drafts per step)
    "tr8": [
        (0,), (1,), (2,), (4,), (0, 0), (1, 0), (0, 0, 0), (0, 0, 0, 0),
    ],
    # 16 nodes, per depth 6/5/3/1/1; calibrated (expected 1.11 accepted drafts per step)
    "tr16": [
        (0,), (1,), (2,), (3,), (4,), (5,), (0, 0), (0, 1), (0, 2), (1, 0), (4, 0), (0, 0, 0),
        (0, 0, 1), (1, 0, 0), (0, 0, 0, 0), (0, 0, 0, 0, 0),
    ],
    # 32 nodes, per depth 8/9/8/5/1/1; calibrated (expected 1.29 accepted drafts per step)
    "tr32": [
        (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
        (2, 0), (3, 0), (4, 0), (5, 0), (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 2, 0),
        (1, 0, 0), (1, 0, 1), (2, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2), (0, 0, 1, 0),
        (1, 0, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0),
    ],
    # 48 nodes, per depth 7/13/13/8/5/2
    "tr48": [
        (0,), (1,), (2,), (3,), (4,), (5,), (6,), (0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (0, 3),
        (3, 0), (1, 1), (0, 4), (4, 0), (1, 2), (2, 1), (0, 5), (0, 0, 0), (0, 1, 0), (1, 0, 0),
        (0, 0, 1), (0, 0, 2), (0, 2, 0), (2, 0, 0), (0, 0, 3), (0, 3, 0), (3, 0, 0), (0, 1, 1),
        (1, 0, 1), (1, 1, 0), (0, 0, 0, 0), (0, 0, 0, 1), (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0),
        (0, 0, 0, 2), (0, 0, 2, 0), (0, 2, 0, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0),
        (0, 1, 0, 0, 0), (1, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1),
    ],
    # 80 nodes, per depth 8/21/25/15/8/3
    "tr80": [
        (0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,), (0, 0), (0, 1), (1, 0), (0, 2), (2, 0),
        (0, 3), (3, 0), (1, 1), (0, 4), (4, 0), (1, 2), (2, 1), (0, 5), (5, 0), (0, 6), (6, 0),
        (1, 3), (3, 1), (0, 7), (7, 0), (2, 2), (0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1),
        (0, 0, 2), (0, 2, 0), (2, 0, 0), (0, 0, 3), (0, 3, 0), (3, 0, 0), (0, 1, 1), (1, 0, 1),
        (1, 1, 0), (0, 4, 0), (4, 0, 0), (0, 0, 4), (0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0),
        (2, 0, 1), (2, 1, 0), (0, 0, 5), (0, 5, 0), (5, 0, 0), (0, 0, 0, 0), (0, 0, 0, 1),
        (0, 1, 0, 0), (1, 0, 0, 0), (0, 0, 1, 0), (0, 0, 0, 2), (0, 0, 2, 0), (0, 2, 0, 0),
        (2, 0, 0, 0), (0, 0, 3, 0), (0, 3, 0, 0), (3, 0, 0, 0), (0, 0, 0, 3), (0, 1, 0, 1),
        (0, 1, 1, 0), (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0), (0, 1, 0, 0, 0),
        (1, 0, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 0, 2), (0, 0, 0, 2, 0), (0, 0, 0, 0, 0, 0),
        (0, 0, 0, 0, 0, 1), (0, 0, 0, 0, 1, 0),
    ],
}
