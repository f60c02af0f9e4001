"""ALP-GMM over the cpu preset's topics only: addition, subtraction and multiplication.

    soar train --teacher examples.edge_alp_gmm:EdgeALPGMM --preset cpu --steps 12

The cpu preset's hard set holds only these three families (``bundled-edge``). The paper's
teacher prompt names the target benchmark's topics; for a curriculum teacher over the
generators, the same knowledge is the box it searches, so its tasks are mixtures of these
families at every difficulty rather than of all ten.
"""

from typing import Any

from agents import ALPGMMTeacher

EDGE_FAMILIES = ("addition", "subtraction", "multiplication")


class EdgeALPGMM(ALPGMMTeacher):
    """`agents.ALPGMMTeacher` with ``families`` fixed to the cpu preset's topics; other options pass through."""

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(families=EDGE_FAMILIES, seed=seed, **options)
