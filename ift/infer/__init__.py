"""Inference outside the HTTP server, on the serve package's decode engine
(`ift.serve.engine`), so prompts, stopping and sampling are the server's own:

- `ift predict -c predict.yaml` (predict.py): Ray Data batch generation over a prepared
  dataset's val split or raw files, in input order, resumable by shard;
- `ift chat --url URL --model M` / `ift chat --model-path DIR [--adapter DIR]` (chat.py): a
  streamed multi-turn terminal chat, against a server or in-process.
"""
