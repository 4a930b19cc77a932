"""Choose the memory-fused variant's weight on the validation split.

Loads the final learner state of a finished validation run (`keep_states: true`,
`evaluation.split: validation`) and prints Last (validation accuracy over all classes)
for text-only scoring and for text + w * memory scores, per score kind and weight:

    python bench/tune_memory_weight.py runs/tune/dmc_ot/trial0 --method dmc_ot --seed 1993

(`runs/tune/dmc_ot/trial<i>`: a trial of bench/tune.py.) The weights of each score kind
span its scale: FeCAM's scores of L2-normalised features are ~100x smaller than cosine
logits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import yaml

from dmc_core.experiment.config import ExperimentConfig
from dmc_core.experiment.runner import ExperimentRunner, make_plan
from dmc_core.state import load_state

WEIGHTS = {
    "cosine": [0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0],
    "mahalanobis": [0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3],
    "fecam": [0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--method", default="dmc_ot")
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument(
        "--fecam-alphas",
        type=float,
        nargs="+",
        default=[1.0],
        help="memory.shrink_alpha1 = shrink_alpha2 values tried with the fecam score",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ExperimentConfig.from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    if config.evaluation.split != "validation":
        raise SystemExit(f"{args.run} was evaluated on {config.evaluation.split}, not validation")
    runner = ExperimentRunner(config, args.run, resume=True, show_progress=False)
    plan = make_plan(config, runner.dataset, args.seed)
    folder = args.run / "progress" / f"{args.method}-seed{args.seed}"
    partial = json.loads((folder / "partial.json").read_text())
    learner = load_state(folder / partial["state"], runner._fresh_backbone())
    classes = [c for task in plan.tasks for c in task]
    split = runner.dataset.split(plan.eval_split)
    features, labels = [], []
    with torch.inference_mode():
        for position, c in enumerate(classes):
            images = split.images.subset(plan.eval_index[c])
            pixels = learner.preprocess([images[i] for i in range(len(images))])
            features.append(torch.cat([learner.encode_images(b) for b in pixels.split(100)]))
            labels.append(np.full(len(images), position))
    x, y = torch.cat(features), torch.as_tensor(np.concatenate(labels))
    print(f"{args.run} {args.method} seed {args.seed}: validation Last (%) by memory weight")
    settings = [("cosine", 1.0), ("mahalanobis", 1.0)]
    settings += [("fecam", alpha) for alpha in args.fecam_alphas]
    for kind, alpha in settings:
        learner.config.inference.memory_score = kind  # type: ignore[assignment]
        learner.config.memory.shrink_alpha1 = learner.config.memory.shrink_alpha2 = alpha
        cells = []
        for weight in WEIGHTS[kind]:
            learner.config.inference.memory_weight = weight
            accuracy = float((learner.feature_logits(x).argmax(1).cpu() == y).float().mean())
            cells.append(f"w={weight:g}: {100 * accuracy:.1f}")
        label = f"{kind} a={alpha:g}" if kind == "fecam" else kind
        print(f"  {label:<14}" + "  ".join(cells))


if __name__ == "__main__":
    main()
