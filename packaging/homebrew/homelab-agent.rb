# Homebrew formula for homelab-agent on macOS (Apple silicon).
#
# A template: .forgejo/workflows/release.yml fills in @VERSION@ and @SHA256@ (the release's
# aarch64-apple-darwin tarball) and uploads the result with the release; put it in a tap
# (README.md, "Install"). NOT RUN here: no macOS in this repository's CI. `brew install
# --HEAD` builds from source with Homebrew's Rust instead.
#
# The LaunchDaemon is the agent's own: `sudo agent install-service` writes
# /Library/LaunchDaemons/homelab.agent.plist (the same code writes the systemd unit on
# Linux) and bootstraps it. Homebrew's `service do` would write a second, different plist
# (and as a LaunchAgent unless run with sudo), so it is not used; the plist the agent
# writes is installed for reference as share/homelab-agent/homelab.agent.plist.
class HomelabAgent < Formula
  desc "Declarative GitOps reconciler: converges a host from a git repository"
  homepage "https://forgejo.ops.eblu.me/eblume/homelab-agent"
  url "https://forgejo.ops.eblu.me/eblume/homelab-agent/releases/download/v@VERSION@/homelab-agent-@VERSION@-aarch64-apple-darwin.tar.gz"
  version "@VERSION@"
  sha256 "@SHA256@"
  license "Apache-2.0"
  head "https://forgejo.ops.eblu.me/eblume/homelab-agent.git", branch: "main"

  depends_on arch: :arm64
  depends_on :macos

  head do
    depends_on "rust" => :build
  end

  def install
    if build.head?
      system "cargo", "install", *std_cargo_args(path: "agent")
    else
      bin.install "agent"
    end
    # Completions and man pages come from the binary's own CLI definition.
    generate_completions_from_executable(bin/"agent", "completions")
    system bin/"agent", "dist-files", "--out", buildpath/"generated", "--platform", "macos",
           "--binary", opt_bin/"agent", "--config", "/usr/local/etc/homelab-agent/agent.yaml"
    man1.install Dir[buildpath/"generated/man/man1/*.1"]
    (share/"homelab-agent").install buildpath/"generated/service/homelab.agent.plist"
  end

  def caveats
    <<~EOS
      The agent runs as a LaunchDaemon (root, from boot). Start a homelab repository and
      let the agent install its own service:
        agent init ~/homelab                   # hosts/, an example module, agent.yaml, README.md
        sudo install -d -m 755 /usr/local/etc/homelab-agent
        sudo install -m 600 ~/homelab/agent.yaml /usr/local/etc/homelab-agent/agent.yaml
        sudo #{opt_bin}/agent install-service  # /Library/LaunchDaemons/homelab.agent.plist
      It logs to /var/log/homelab-agent.log; `sudo agent uninstall-service` removes it.
    EOS
  end

  test do
    assert_match(/^agent \d+\.\d+\.\d+ \((commit \h+|unknown commit), built for /,
                 shell_output("#{bin}/agent --version"))
    system bin/"agent", "init", testpath/"lab", "--host", "box"
    system bin/"agent", "validate", "--repo", testpath/"lab"
    assert_match "homelab.agent", shell_output("#{bin}/agent install-service --dry-run")
  end
end
