"""Routed experts that ask the dispatchers for padded row groups, as TE's FP8 experts do, on the CPU."""

from megatron_ds.model.moe import GroupedExperts


class AlignedExperts(GroupedExperts):
    """GroupedExperts asking for 8-row groups, as TE's FP8 experts ask for 16 or 128."""

    def row_alignment(self, dtype):
        return 8
