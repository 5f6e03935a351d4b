"""RealEra (Liu et al., 2024) as the CRCE authors re-implemented it on ESD-x (the CRCE code's
`execute_realera_sampling`, srcs/realera_tools.py; paper appendix B: M = 10, N = 2)."""

from __future__ import annotations

from .sphere import Sphere


class RealEra(Sphere):
    """RealEra on ESD-x, as the CRCE code runs it: odd iterations take the ESD term alone (`if i % 2:`), even ones the neighbour terms
    alone, summed over the neighbours (no 1/M, 1/N)."""

    name = "realera"
    reduce = "sum"

    def plan(self, iteration, generator):
        if iteration % 2:
            return self.esd_only()
        plan = super().plan(iteration, generator)
        plan.esd_term = False
        return plan
