"""`python -m services.tools.fetch_model REPO_ID DIR [--revision REV]`: a checkpoint into a directory.

Fills a model volume once (deploy/k8s/models/fill-job.yaml): downloads from the Hugging Face Hub
only what the services read (services.common.checkpoint.HUB_ALLOW_PATTERNS, no upstream *.py), into
DIR as plain files, then checks that DIR is a complete checkpoint (config.json, tokenizer, every
safetensors shard the index names). Rerunning fetches only what is missing. Exit status: 0 complete,
1 download failed or checkpoint incomplete (the message says which file), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from services.common.checkpoint import HUB_ALLOW_PATTERNS, CheckpointError, tensor_index

log = logging.getLogger("services.tools.fetch_model")

REQUIRED_FILES = ("config.json", "tokenizer.model")


def check_checkpoint(directory: Path) -> int:
    """The number of safetensors files of a complete checkpoint in `directory`; CheckpointError if not."""
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} is missing")
    shards = set(tensor_index(directory).values())
    missing = sorted(p.name for p in shards if not p.is_file())
    if missing:
        raise CheckpointError(f"{directory} is incomplete: {', '.join(missing)} missing")
    return len(shards)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.tools.fetch_model", description=__doc__.split("\n")[0])
    parser.add_argument("repo_id", help="Hub repo id, e.g. OpenGVLab/InternVL2-8B")
    parser.add_argument("directory", type=Path, help="where the checkpoint's files go (created if missing)")
    parser.add_argument("--revision", default=None, help="branch, tag or commit to fetch (default: main)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id=args.repo_id, revision=args.revision, local_dir=args.directory,
                          allow_patterns=HUB_ALLOW_PATTERNS)
        shards = check_checkpoint(args.directory)
    except CheckpointError as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:  # hub errors come in many types (offline, 404, auth, disk full)
        log.error("could not fetch %s into %s: %s: %s", args.repo_id, args.directory, type(exc).__name__, exc)
        return 1
    log.info("%s is complete in %s (%d safetensors file(s))", args.repo_id, args.directory, shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
