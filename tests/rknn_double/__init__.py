"""C doubles of the Rockchip NPU runtimes, and the helpers that build and drive them."""
