"""launch/split_cost.py times a step cut into parts: the cut step must be the same step.

Against the whole model stepped as one piece (the reference), on the same weights:
greedy tokens of several sequences over several steps, for cuts into 2 and 3 parts.
"""

import mlx.core as mx
import pytest

from launch.split_cost import Stepper
from tests.reference import build_tiny


@pytest.mark.parametrize("model_type", ["glm4_moe", "llama4"])
@pytest.mark.parametrize("parts", [2, 3])
def test_a_step_in_parts_gives_the_whole_steps_tokens(model_type, parts):
    _, model = build_tiny(model_type)
    n = len(model.owned_layers())
    cuts = [n * k // parts for k in range(parts + 1)]
    whole, split = Stepper(model, rows=3), Stepper(model, rows=3)
    a, b = whole.tokens, split.tokens
    for _ in range(4):
        a, b = whole.step(a, [0, n]), split.step(b, cuts)
        assert mx.array_equal(a, b).item(), (a.tolist(), b.tolist())
