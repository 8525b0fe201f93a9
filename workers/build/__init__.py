"""The offline build: checkpoint readers (Hugging Face, GGUF), the streaming safetensors writer and
`meshserve build` itself."""
