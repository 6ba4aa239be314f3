//! viridiand, the management service.
