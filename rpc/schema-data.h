#pragma once

/* The merged schema (the JSON files of schemas/), generated at build time. */
extern const char cbt_schema_json[];
