#!/usr/bin/env bash
# Run HERE (not on the device machine, which has no internet): puts into .whl (git-ignored) the wheels that
# gpu_setup.sh installs there on top of the image's torch + CUDA: fish-speech 0.1.0 and the packages it needs that
# such an image lacks, pinned to the versions checked there. Then give the device calls carry [".whl"] (about 6 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
# Pure Python (some are published as source archives only: built here, they run there too)
python3 -m pip wheel -q --no-deps -w .whl \
  fish-speech==0.1.0 descript-audio-codec==1.0.0 descript-audiotools==0.7.2 hydra-core==1.3.8 omegaconf==2.3.1 \
  antlr4-python3-runtime==4.9.3 loguru==0.7.3 loralib==0.1.2 natsort==8.4.0 flatten-dict==0.5.0 julius==0.2.8 \
  ffmpy==1.0.0 importlib-resources==7.1.0 randomname==0.2.1 fire==0.7.1 termcolor==3.3.0 argbind==0.3.9 \
  docstring-parser==0.18.0 librosa==0.11.0 audioread==3.1.0 pooch==1.9.0 decorator==5.3.1 pycparser==3.12 \
  python-dotenv==1.2.4 pyrootutils==1.0.4 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
# Compiled: the device machine's CPython 3.12 on x86-64 manylinux
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pydantic-core==2.50.5
ls .whl | wc -l
