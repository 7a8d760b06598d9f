import pytest

from tasprune import create_model
from tasprune.latency import LatencyConfig, measure_latency


def test_latency_by_batch_size():
    model = create_model("resnet8", num_classes=3, in_channels=1, resolution=8)
    model.train()
    result = measure_latency(model, (1, 8, 8), LatencyConfig(batch_sizes=(1, 4), warmup=1,
                                                              repeats=3))
    assert set(result) == {1, 4} and all(v > 0 for v in result.values())
    assert model.training  # mode restored


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": ()}, "batch sizes"), ({"batch_sizes": (0,)}, "batch sizes"),
    ({"repeats": 2, "min_repeats": 3}, "min_repeats"), ({"max_seconds": 0}, "max_seconds"),
])
def test_latency_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LatencyConfig(**kwargs)
