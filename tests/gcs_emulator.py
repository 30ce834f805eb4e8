"""gcp-storage-emulator, completed where orbax's tensorstore needs it: python gcs_emulator.py HOST PORT BUCKET.

What the stock emulator lacks, and real GCS does:
- the object's generation in a download's `x-goog-generation` header (tensorstore reads it to
  know which version it read; without it every read fails as "Malformed StorageGeneration");
- the ifGenerationMatch / ifGenerationNotMatch preconditions (OCDBT commits its manifest with
  a conditional write, and revalidates cached reads with a conditional read);
- concurrent connections: it serves one request at a time with a listen backlog of 5, so a
  trainer's parallel writes overflow the backlog and dropped connects back off until they time
  out. Threads accept every connection; one lock still applies requests one at a time, as the
  emulator's storage expects.
"""

import sys
import threading
from http import HTTPStatus
from http import server as http_server

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_MISSING = "0"  # GCS's generation of an absent object in preconditions


def _generation(storage, bucket: str, name: str) -> str:
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return _MISSING


def _failed_precondition(request, storage, name: str, reading: bool):
  """The status a request's generation preconditions call for, or None when they hold."""
  match = request.query.get("ifGenerationMatch")
  not_match = request.query.get("ifGenerationNotMatch")
  if not match and not not_match:
    return None
  current = _generation(storage, request.params["bucket_name"], name)
  if match and match[0] != current:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match and not_match[0] == current:
    return HTTPStatus.NOT_MODIFIED if reading else HTTPStatus.PRECONDITION_FAILED
  return None


def _with_preconditions(handler, name_of, reading: bool):
  def checked(request, response, storage, *args, **kwargs):
    name = name_of(request)
    if name is not None:
      status = _failed_precondition(request, storage, name, reading)
      if status is not None:
        response.status = status
        return None
      generation = _generation(storage, request.params["bucket_name"], name)
      if reading and generation != _MISSING:
        response["x-goog-generation"] = generation
    return handler(request, response, storage, *args, **kwargs)
  return checked


def _object_param(request):
  return request.params.get("object_id")


def _upload_name(request):
  return (request.query.get("name") or [None])[0]


def _patch_handlers() -> None:
  objects.download = _with_preconditions(objects.download, _object_param, reading=True)
  objects.get = _with_preconditions(objects.get, _object_param, reading=True)
  objects.delete = _with_preconditions(objects.delete, _object_param, reading=False)
  objects.insert = _with_preconditions(objects.insert, _upload_name, reading=False)


class _ThreadedServer(http_server.ThreadingHTTPServer):
  request_queue_size = 1024
  daemon_threads = True


def main(host: str, port: int, bucket: str) -> None:
  _patch_handlers()
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top  (after the patch)
  server.server.HTTPServer = _ThreadedServer
  one_at_a_time, handle = threading.Lock(), server.Router.handle

  def serialised(router, method):
    with one_at_a_time:
      return handle(router, method)

  server.Router.handle = serialised
  server.create_server(host, port, in_memory=True, default_bucket=bucket).start()
  threading.Event().wait()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
