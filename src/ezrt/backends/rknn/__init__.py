"""The Rockchip NPU backend: librknnrt through ctypes."""
