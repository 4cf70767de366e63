"""Datasets as sharded WebDataset tar files, wherever they live (local disk, http(s), S3, pipe:): packing, the
catalog of a source's shards, reading with retries, and a resumable, rank- and worker-split stream.

Layout of a packed dataset directory::

    index.json                  {"channels", "classes", "splits": {name: {"count", "shards": [{file, count}]}}}
    train-000000.tar ...        WebDataset samples: <key>.png (or .jpg ...) and <key>.cls

A latent dataset (`gen-dist data latents`) has the same shards, keys and labels with <key>.latent.npy (float32
C H W) in place of the image, and a "latents" entry in its index naming the first stage that encoded it.

Each epoch the shard order is permuted (seed, epoch), the concatenated samples are cut into one contiguous
range per (rank, worker) slot, and every rank takes the same number of batches. Ranges may start inside a
shard, so any number of shards works with any number of slots, and no rank ever waits on another for data.
The stream position is (epoch, batches consumed in the epoch): everything else is derived from the seed.
When the layout (ranks, workers, batch size, shuffle buffer) changes mid-epoch, the samples the earlier
layout consumed are found by replaying its split and shuffle, and the rest of the epoch is cut among the
new slots the same way.
"""

from gen_dist.data.bucketed import BucketStream, make_stream
from gen_dist.data.catalog import Catalog, Shard, image_sizes, open_catalog
from gen_dist.data.pack import (
    pack_arrays,
    pack_digits,
    pack_idx_dir,
    pack_image_folder,
    read_idx,
    write_latent_shards,
    write_shards,
)
from gen_dist.data.reader import (
    Retry,
    check_catalog,
    fields_of,
    first_sample,
    index_source,
    probe_remote,
    read_pieces,
    reference_catalog,
    reference_images,
    split_images,
)
from gen_dist.data.shards import INDEX, DataError, Fields, Piece, decode_image, decode_latent, load_index
from gen_dist.data.sources import Cache
from gen_dist.data.stream import (
    BadSamples,
    DataPosition,
    ReadLayout,
    Segment,
    ShardStream,
    batch_sizes,
    make_loader,
)

__all__ = ["BadSamples", "BucketStream", "Cache", "Catalog", "DataError", "DataPosition", "Fields", "INDEX", "Piece",
           "ReadLayout", "Retry", "Segment", "Shard", "ShardStream", "batch_sizes", "check_catalog",
           "decode_image", "decode_latent", "fields_of", "first_sample", "image_sizes", "index_source",
           "load_index", "make_loader", "make_stream", "open_catalog", "pack_arrays", "pack_digits",
           "pack_idx_dir", "pack_image_folder", "probe_remote", "read_idx", "read_pieces",
           "reference_catalog", "reference_images", "split_images", "write_latent_shards", "write_shards"]
