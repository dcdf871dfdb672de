"""A local Google Cloud Storage for tests: gcp-storage-emulator on 127.0.0.1, in memory,
with the two GCS behaviours it lacks and the checkpoint stack needs (ENV.md):

  * the object's generation on every read (`x-goog-generation`): TensorStore's gcs kvstore
    reads it to order its writes (without it: "Malformed StorageGeneration");
  * preconditions on writes and reads (`ifGenerationMatch`, `ifGenerationNotMatch`): OCDBT's
    manifest updates and the workdir lock's exclusive create (`ifGenerationMatch=0`).

`start()` -> (server, environment variables that point gcsfs, google-cloud-storage and
TensorStore at it). The bucket is `bucket`.
"""

from __future__ import annotations

import functools
import socket
from http import HTTPStatus

from gcp_storage_emulator import server as server_lib
from gcp_storage_emulator.exceptions import NotFound

BUCKET = 'bucket'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _object_name(request) -> str | None:
  params = getattr(request, 'params', None) or {}
  if params.get('object_id'):
    return params['object_id']
  names = request.query.get('name')
  if names:
    return names[0]
  data = getattr(request, 'data', None)  # a multipart upload names it in its metadata
  return data['meta'].get('name') if isinstance(data, dict) and data.get('meta') else None


def _generation(storage, request) -> str | None:
  """The live object's generation, None if there is none."""
  name, bucket = _object_name(request), (getattr(request, 'params', None) or {}).get(
      'bucket_name')
  if not (name and bucket):
    return None
  try:
    return str(storage.get_file_obj(bucket, name).get('generation') or '0')
  except NotFound:
    return None


def _with_generations(handler):
  @functools.wraps(handler)
  def wrapped(request, response, storage, *args, **kwargs):
    query = request.query
    current = _generation(storage, request)
    match = query.get('ifGenerationMatch', [None])[0]
    if match is not None and (current or '0') != str(match):
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    not_match = query.get('ifGenerationNotMatch', [None])[0]
    if not_match is not None and current is not None and current == str(not_match):
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    result = handler(request, response, storage, *args, **kwargs)
    after = _generation(storage, request)
    if after is not None:
      response['x-goog-generation'] = after
      response['x-goog-metageneration'] = '1'
    return result
  return wrapped


def _patch_handlers() -> None:
  for _, methods in server_lib.HANDLERS:
    for method, handler in list(methods.items()):
      if not getattr(handler, '_with_generations', False):
        methods[method] = _with_generations(handler)
        methods[method]._with_generations = True


def start():
  """-> (running server, {env var: value}); call `server.stop()` when done."""
  _patch_handlers()
  port = _free_port()
  server = server_lib.create_server('127.0.0.1', port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f'http://127.0.0.1:{port}'
  env = {'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage
         'TENSORSTORE_GCS_HTTP_URL': url,  # TensorStore ignores the variable above
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'NO_GCE_CHECK': 'true'}
  return server, env
