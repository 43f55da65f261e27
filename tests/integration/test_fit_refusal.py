"""A real decoder process given a checkpoint its device cannot hold exits at once with a clear message.

The checkpoint directory holds only InternVL2-Llama3-76B's config.json: in fp32 on this CPU it needs
about 0.6 TB (weights, the engine's prepacked copy, the KV cache), far beyond the RAM of any test
machine, and the check comes before any weight is read (there are none to read).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.common.device_memory import MEMINFO, cpu_memory
from services.common.model_config import InternVLConfig
from services.language_decoder.config import DecoderConfig
from services.language_decoder.fit_check import decoder_start_need
from tests.integration.procs import REPO_ROOT

REAL_76B = REPO_ROOT / "tests" / "fixtures" / "real_configs" / "internvl2-llama3-76b.json"


def test_decoder_process_refuses_a_model_bigger_than_the_machine(tmp_path: Path):
    root = tmp_path / "InternVL2-Llama3-76B"
    root.mkdir()
    shutil.copy(REAL_76B, root / "config.json")
    config = DecoderConfig(model=str(root), device="cpu")
    need = decoder_start_need(config, InternVLConfig.from_dir(root), "cpu", torch.float32, config.quantize)
    ram = cpu_memory(MEMINFO)
    if ram is None or need.fits(ram):
        pytest.skip(f"premise false here: this machine's free RAM ({ram}) holds {need.total} bytes")
    done = subprocess.run(
        [sys.executable, "-m", "services.language_decoder", "--model", str(root), "--device", "cpu",
         "--port", "0", "--metrics-port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, f"exit {done.returncode}; stderr:\n{done.stderr}"
    assert "language decoder cannot start: InternVL2-Llama3-76B language model does not fit cpu: it needs" \
        in done.stderr, done.stderr
    assert "--quantize int8" in done.stderr and "--dtype bf16" in done.stderr
    assert "Traceback" not in done.stderr
