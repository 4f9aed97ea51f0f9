#pragma once

/* The merged schema (schemas/*.json), generated at build time. */
extern const char cbt_schema_json[];
