"""Model file formats, each one module with its reader and writer: APR v2 (`apr`, with its
metadata `apr_meta` and tensor encodings `apr_quant`), GGUF (`gguf`), safetensors
(`safetensors_io`) and Hugging Face checkpoint directories (`hf`); `sources` picks the reader
for a path."""
