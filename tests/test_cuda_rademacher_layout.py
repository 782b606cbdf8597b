"""The CUDA Rademacher warp pass's index arithmetic, run on the host against the spec.

``csrc/cuda/direction_cuda.cu`` (``rademacher_span``) has each lane of a warp compute one Philox
call and keep one word; lanes read the words they need with ``__shfl_sync``. The arithmetic (which
word a lane keeps, which lane a lane reads at each step, which coordinates and bits it covers) is in
``csrc/hosl_direction.h`` for host and device alike. This test compiles a host program with the C++
compiler that runs that arithmetic for a whole warp, with the shuffle replaced by indexing the 32
lanes' words, and compares the signs it gives each coordinate with ``spec.rademacher_reference``:
no GPU needed (the CUDA kernels' own bit test, tests/test_cuda_kernels.py, needs one).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hosl.directions import spec

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++")

_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "hosl_direction.h"
using namespace hosl;

// argv: key_lo key_hi first. Prints, for coordinates 128*first .. 128*(first + 8) - 1 in order,
// '+' or '-' as the warp pass gives them, '?' for one the pass never wrote, '!' for one written twice.
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const uint32_t k0 = (uint32_t)strtoul(argv[1], 0, 10), k1 = (uint32_t)strtoul(argv[2], 0, 10);
  const uint64_t first = strtoull(argv[3], 0, 10);
  const uint32_t kSpan = kRademacherWarpCounters << kRademacherShift;
  uint32_t words[32];
  for (uint32_t lane = 0; lane < 32; ++lane) words[lane] = rademacher_lane_word(first, lane, k0, k1);
  char out[8 * 128 + 1];
  for (uint32_t c = 0; c < kSpan; ++c) out[c] = '?';
  out[kSpan] = 0;
  for (uint32_t step = 0; step < kRademacherWarpCounters; ++step) {
    for (uint32_t lane = 0; lane < 32; ++lane) {
      const uint32_t signs = words[rademacher_source_lane(lane, step)];  // __shfl_sync on the GPU
      const uint64_t coord0 = rademacher_lane_coord(first, lane, step);
      for (uint32_t i = 0; i < 4; ++i) {
        const uint64_t at = coord0 + i - (first << kRademacherShift);
        if (at >= kSpan) return 3;
        const float z = rademacher_from_word(signs, rademacher_lane_bit(lane) + i);
        out[at] = out[at] == '?' ? (z > 0 ? '+' : '-') : '!';
      }
    }
  }
  puts(out);
  return 0;
}
"""


@pytest.fixture(scope="module")
def warp_pass(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler (c++/g++) on PATH")
    folder = tmp_path_factory.mktemp("rademacher_warp")
    (folder / "warp.cpp").write_text(_PROGRAM)
    exe = folder / "warp"
    subprocess.run([CXX, "-O1", "-std=c++17", f"-I{ROOT / 'csrc'}", str(folder / "warp.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)

    def run(seed: int, first: int) -> str:
        lo, hi = spec.split_seed(seed)
        return subprocess.run([str(exe), str(lo), str(hi), str(first)], check=True, capture_output=True,
                              text=True).stdout.strip()
    return run


@pytest.mark.parametrize("seed", [0, 2**64 - 1, 0x0123456789ABCDEF])
@pytest.mark.parametrize("first", [0, 8, 1 + 2**32, 2**56 - 8])
def test_the_warp_pass_writes_every_coordinate_of_its_span_once_with_the_spec_sign(warp_pass, seed, first):
    got = warp_pass(seed, first)
    assert len(got) == 8 * 128 and set(got) <= {"+", "-"}, got
    want = spec.rademacher_reference(seed, 8 * 128, first * 128)
    assert torch.equal(torch.tensor([1.0 if c == "+" else -1.0 for c in got]), want)
