#!/usr/bin/env bash
# Entrypoint of the compose `kafka` service (apache/kafka 3.9 image, single-node KRaft).
#
# With SASL/SCRAM in KRaft, SCRAM credentials live in the cluster metadata, so nobody can log
# in to create the first user. The users that must exist from the start, the `admin` super
# user and the broker's own `kafka` principal, are written into the metadata when the storage
# is formatted (`kafka-storage.sh format --add-scram`, KIP-900). The image formats without
# them, so this formats first, with the same server.properties the image will render from the
# KAFKA_* variables, then hands over to the image's own start: its format step then reports
# "already formatted", which the image treats as normal (as on every restart).
#
# Passwords come from SCRAM_ADMIN_PASSWORD and SCRAM_BROKER_PASSWORD (not KAFKA_*: the image
# turns every KAFKA_* variable into a broker property). Format happens once, on an empty data
# volume: changing those variables later does not change the stored credentials (use
# kafka-configs.sh --alter --add-config as admin for that).
set -euo pipefail

: "${CLUSTER_ID:?}" "${KAFKA_LOG_DIRS:?}" "${SCRAM_ADMIN_PASSWORD:?}" "${SCRAM_BROKER_PASSWORD:?}"
STORAGE_TOOL="${STORAGE_TOOL:-/opt/kafka/bin/kafka-storage.sh}"
IMAGE_START="${IMAGE_START:-/etc/kafka/docker/run}"

# The image's own rule (kafka.docker.KafkaDockerWrapper): KAFKA_FOO_BAR -> foo.bar,
# `___` -> `-`, `__` -> `_`, except the variables the launch scripts themselves read.
server_properties() {
  local name key
  for name in $(compgen -e); do
    case "$name" in
      KAFKA_VERSION | KAFKA_HEAP_OPTS | KAFKA_LOG4J_OPTS | KAFKA_OPTS | KAFKA_JMX_OPTS | \
        KAFKA_JVM_PERFORMANCE_OPTS | KAFKA_GC_LOG_OPTS | KAFKA_LOG4J_ROOT_LOGLEVEL | \
        KAFKA_LOG4J_LOGGERS | KAFKA_TOOLS_LOG4J_LOGLEVEL | KAFKA_JMX_HOSTNAME) continue ;;
      KAFKA_*) ;;
      *) continue ;;
    esac
    key=$(printf '%s' "${name#KAFKA_}" | tr '[:upper:]' '[:lower:]' | sed -e 's/_/./g' -e 's/\.\.\./-/g' -e 's/\.\./_/g')
    printf '%s=%s\n' "$key" "${!name}"
  done
}

first_dir="${KAFKA_LOG_DIRS%%,*}"
if [[ ! -f "$first_dir/meta.properties" ]]; then
  umask 077
  props=$(mktemp)
  trap 'rm -f "$props"' EXIT
  server_properties >"$props"
  echo "===> Formatting $KAFKA_LOG_DIRS with the SCRAM users admin and kafka"
  "$STORAGE_TOOL" format --cluster-id "$CLUSTER_ID" --config "$props" --ignore-formatted \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$SCRAM_ADMIN_PASSWORD]" \
    --add-scram "SCRAM-SHA-512=[name=kafka,password=$SCRAM_BROKER_PASSWORD]"
  rm -f "$props"
  trap - EXIT
  umask 022
fi

exec "$IMAGE_START"
