"""`stepaudio` command line: train, and print a resolved config."""

import argparse
import logging
import os
import sys


def _train(args) -> int:
  import jax

  from stepaudio_jax.config import dump_config, load_config
  from stepaudio_jax.training.trainer import train

  cfg = load_config(args.config, args.overrides, num_devices=jax.device_count())
  os.makedirs(cfg.train.run_dir, exist_ok=True)
  if jax.process_index() == 0:
    dump_config(cfg, os.path.join(cfg.train.run_dir, "config.yaml"))
  train(cfg)
  return 0


def _show_config(args) -> int:
  from stepaudio_jax.config import dump_config, load_config

  dump_config(load_config(args.config, args.overrides), "/dev/stdout")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="stepaudio", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, fn, text in (("train", _train, "train a model from a config"),
                         ("show-config", _show_config, "print the resolved config")):
    p = sub.add_parser(name, help=text)
    p.add_argument("config", help="YAML config file (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    p.set_defaults(fn=fn)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from stepaudio_jax.config import ConfigError
  from stepaudio_jax.training.checkpoint import CheckpointError

  try:
    return args.fn(args)
  except (ConfigError, CheckpointError) as e:
    print(f"stepaudio {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
