mod tracing_layer;
