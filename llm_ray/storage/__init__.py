"""Where outputs live, a leaf below every other layer: it imports nothing else of llm_ray.

- ``location``: ``Location`` (a local path or s3://bucket/key behind the path operations the pipeline
  uses), writability, and the storage rule for a cluster of several nodes;
- ``s3``: the S3 settings, pyarrow's filesystem, credentials and errors;
- ``local``: this node's cache, and replacing a folder whole.
"""

from llm_ray.storage.local import cache_dir, exchange_paths, node_cache, replace_folder
from llm_ray.storage.location import (Location, as_location, check_shared, check_writable, local_copy,
                                      local_folder)
from llm_ray.storage.s3 import (S3Settings, StorageError, check_credentials, check_s3_uri, s3_error, s3_filesystem,
                                s3_reason)

__all__ = ["Location", "S3Settings", "StorageError", "as_location", "cache_dir", "check_credentials", "check_s3_uri",
           "check_shared", "check_writable", "exchange_paths", "local_copy", "local_folder", "node_cache",
           "replace_folder", "s3_error", "s3_filesystem", "s3_reason"]
