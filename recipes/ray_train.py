"""`polyglu sft` on Ray Train: a TorchTrainer runs the same entry point on every worker.

    python recipes/ray_train.py --num_workers 2 -- --config recipes/polyglu_full.yaml --output_dir outputs/ray-run
    python recipes/ray_train.py --num_workers 8 --use_gpu -- --config recipes/polyglu_full.yaml

Everything after `--` is `polyglu sft`'s arguments. Ray starts the workers and their torch.distributed process group
(gloo on CPUs, NCCL on GPUs); the Trainer inside each worker finds it and trains data-parallel, exactly as under
`accelerate launch` (same sharded data, same all-reduced routing metrics; rank 0 writes the model and the reports).
With `--address` the job joins a running Ray cluster; otherwise a local one is started for it.
"""

import argparse
import sys


def train_worker(config: dict) -> None:
    from modeling_polyglu.training.sft import main

    main(config["sft_arguments"])


def parse_arguments(argv):
    if "--" in argv:
        split = argv.index("--")
        own, sft_arguments = argv[:split], argv[split + 1 :]
    else:
        own, sft_arguments = argv, []
    parser = argparse.ArgumentParser(prog="ray_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_workers", type=int, default=2, help="Training processes (one per GPU with --use_gpu).")
    parser.add_argument("--use_gpu", action="store_true", help="One GPU per worker (default: CPU workers).")
    parser.add_argument("--cpus_per_worker", type=int, default=1)
    parser.add_argument("--address", default=None, help="A running Ray cluster to join (default: start a local one).")
    parser.add_argument("--storage_path", default=None, help="Where Ray Train keeps its run records (default ~/ray_results).")
    parser.add_argument("--name", default="polyglu-sft", help="Name of the Ray Train run.")
    arguments = parser.parse_args(own)
    if arguments.num_workers < 1:
        parser.error(f"--num_workers must be at least 1, got {arguments.num_workers}.")
    if not sft_arguments:
        parser.error("give polyglu sft's arguments after `--`, e.g. `-- --config recipes/polyglu_full.yaml`.")
    return arguments, sft_arguments


def main(argv=None) -> int:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    arguments, sft_arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments.address is None:
        ray.init(num_cpus=arguments.num_workers * arguments.cpus_per_worker + 1, include_dashboard=False)
    else:
        ray.init(address=arguments.address)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"sft_arguments": sft_arguments},
        scaling_config=ScalingConfig(
            num_workers=arguments.num_workers,
            use_gpu=arguments.use_gpu,
            resources_per_worker={"CPU": arguments.cpus_per_worker},
        ),
        run_config=RunConfig(name=arguments.name, storage_path=arguments.storage_path),
    )
    result = trainer.fit()
    ray.shutdown()
    if result.error is not None:
        print(f"Ray Train run failed: {result.error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
