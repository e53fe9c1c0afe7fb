# Sourced by the tools/ scripts: installs what fencelog needs on a Debian machine, only when it
# is missing. etcd (package etcd-server) runs the integration tests; protoc (package
# protobuf-compiler) builds etcd-client's protos.
need_packages=()
command -v etcd >/dev/null 2>&1 || need_packages+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_packages+=(protobuf-compiler)
command -v cc >/dev/null 2>&1 || need_packages+=(build-essential)
# The tests check docs/ops/: the alert rules with promtool (package prometheus), the systemd
# units with systemd-analyze (package systemd), and tests/monitoring.rs runs a Prometheus server
# of its own on a loopback port (no service of either package is started).
command -v promtool >/dev/null 2>&1 || need_packages+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need_packages+=(systemd)
# The font `fencelog bench --plot` labels its chart with.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_packages+=(fonts-dejavu-core)
# A script may ask for more commands whose Debian package has the same name.
for tool in "${extra_tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || need_packages+=("$tool")
done
if [ ${#need_packages[@]} -gt 0 ]; then
  echo "installing ${need_packages[*]} ..."
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not on the PATH: install a Rust toolchain (rustup) first" >&2
  exit 1
fi

# Where `cargo build --release` puts the binary: CARGO_TARGET_DIR when set (relative to the
# repository root, where the tools run), else target/.
release_bin="${CARGO_TARGET_DIR:-target}/release/fencelog"
