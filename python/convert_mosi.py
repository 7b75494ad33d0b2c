#!/usr/bin/env python
"""Build mdm_kernels/data/mosi_bclstm.npz from the raw MOSI release.

Usage: python python/convert_mosi.py [--src ../shared/data/mosi] [--out mdm_kernels/data]

Inputs: the bc-LSTM utterance features (MIT, declare-lab), the continuous labels of
MOSI-label.csv (joined by f"{video_id}_{clip_id}") and the GloVe 840B rows of the MOSI
vocabulary.  Keeps the bc-LSTM split; validation = ~15% of the train videos (whole videos).
"""
import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mdm_kernels.train.data.mosi import build_from_raw  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=str(ROOT.parent / "shared" / "data" / "mosi"))
    p.add_argument("--out", default=str(ROOT / "mdm_kernels" / "data"))
    args = p.parse_args()
    src, out = Path(args.src), Path(args.out)
    arrays = build_from_raw(src)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "mosi_bclstm.npz", **arrays)
    shutil.copyfile(src / "bclstm" / "LICENSE", out / "LICENSE-bclstm")
    sp = arrays["split"]
    print(f"wrote {out / 'mosi_bclstm.npz'} ({(out / 'mosi_bclstm.npz').stat().st_size / 1e6:.2f} MB): "
          f"train {int((sp == 0).sum())}, valid {int((sp == 1).sum())}, test {int((sp == 2).sum())}; "
          f"{len(arrays['glove'])} GloVe rows")


if __name__ == "__main__":
    main()
