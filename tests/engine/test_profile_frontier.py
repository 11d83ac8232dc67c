"""bench.profile_step.frontier_costs: what each kernel adds to a step's critical path when kernels
overlap (programmatic dependent launch) or leave the GPU idle."""

from bench.profile_step import frontier_costs


def test_overlapping_kernels_add_only_past_the_frontier():
    kernels = [
        ("norm", 0, 4),
        ("gemv", 2, 20),   # starts early (PDL) and waits: adds 16, not its 18
        ("rope", 19, 23),  # overlaps the gemv's tail: adds 3
        ("tiny", 20, 22),  # ends inside earlier work: adds nothing
        ("gemv", 30, 40),  # after 7 idle: adds its whole 10
    ]
    costs, idle = frontier_costs(list(reversed(kernels)))  # any order in
    assert idle == 7
    assert costs == {"norm": [1, 4, 4], "gemv": [2, 26, 28], "rope": [1, 3, 4], "tiny": [1, 0, 2]}
    assert sum(c[1] for c in costs.values()) + idle == 40  # the span


def test_no_kernels():
    assert frontier_costs([]) == ({}, 0.0)
