#!/usr/bin/env bash
# Builds the three images the chart and the runs use, tagged with the chart's appVersion:
#   <registry>/operator:<appVersion>  images/operator.Dockerfile
#   <registry>/trainer:<appVersion>   images/gpu.Dockerfile, target trainer
#   <registry>/vllm:<appVersion>      images/gpu.Dockerfile, target vllm
# <registry> is the chart's images.registry unless REGISTRY is set (then install the chart with
# --set images.registry=$REGISTRY). `--push` pushes them too. DOCKER names another client (podman).
set -euo pipefail
cd "$(dirname "$0")/.."

chart=charts/grpo-operator
tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "$chart/Chart.yaml")
registry=${REGISTRY:-$(sed -n 's/^  registry: *//p' "$chart/values.yaml")}
docker=${DOCKER:-docker}

images=()
build() {  # build NAME DOCKERFILE [TARGET]
  local image="$registry/$1:$tag"
  "$docker" build --file "$2" ${3:+--target "$3"} --tag "$image" .
  images+=("$image")
}
build operator images/operator.Dockerfile
build trainer images/gpu.Dockerfile trainer
build vllm images/gpu.Dockerfile vllm

if [ "${1:-}" = "--push" ]; then
  for image in "${images[@]}"; do "$docker" push "$image"; done
fi
printf 'built %s\n' "${images[@]}"
