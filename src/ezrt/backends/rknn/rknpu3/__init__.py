"""RKNPU3: Rockchip's next NPU runtime, ``librknn3_api``, through ctypes."""
