"""The class-incremental experiment runner: protocols, methods, metrics, runs and reports.

```python
from dmc_core.experiment import load_experiment_config, run_experiment

config = load_experiment_config(Path("configs/fashion_mnist_standin.yaml"), ["seeds=[1993]"])
results = run_experiment(config, Path("runs/fmnist"), resume=True)
```
"""

from dmc_core.experiment.config import (
    ExperimentConfig,
    ExperimentError,
    load_experiment_config,
)
from dmc_core.experiment.runner import Event, run_experiment

__all__ = [
    "Event",
    "ExperimentConfig",
    "ExperimentError",
    "load_experiment_config",
    "run_experiment",
]
