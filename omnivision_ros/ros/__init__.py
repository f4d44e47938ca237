"""ROS 2 helpers of the node: image conversion, camera frame store, parameters, diagnostics."""
