"""The rank runtime: mesh, parallel layers, the Llama stage, KV cache, sampler, step plans and runner."""
