-- A v1 annotation database (schema of issue 5, store/annotations.py before the v2 migration) with some data:
-- generated once from that code, for tests/test_migrations.py. Do not edit by hand.
BEGIN TRANSACTION;
CREATE TABLE concept (
	id VARCHAR(64) NOT NULL, 
	name VARCHAR(200) NOT NULL, 
	description VARCHAR(1000) NOT NULL, 
	builtin BOOLEAN NOT NULL, 
	position INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	CONSTRAINT pk_concept PRIMARY KEY (id)
);
INSERT INTO "concept" VALUES('mass','mass','a space-occupying lesion seen in two projections',1,0,'2026-11-26 00:40:06.420740');
INSERT INTO "concept" VALUES('calcification','calcification','calcium deposits: bright specks, alone or clustered',1,1,'2026-11-26 00:40:06.420747');
INSERT INTO "concept" VALUES('spiculated_margin','spiculated margin','lines radiating from the margin of a mass',1,2,'2026-11-26 00:40:06.420748');
INSERT INTO "concept" VALUES('circumscribed_margin','circumscribed margin','a sharply demarcated mass margin',1,3,'2026-11-26 00:40:06.420748');
INSERT INTO "concept" VALUES('architectural_distortion','architectural distortion','distorted parenchyma without a visible mass',1,4,'2026-11-26 00:40:06.420751');
INSERT INTO "concept" VALUES('skin','skin','the skin line at the breast''s edge',1,5,'2026-11-26 00:40:06.420751');
INSERT INTO "concept" VALUES('film_label','film label','burned-in text and labels outside the breast',1,6,'2026-11-26 00:40:06.420752');
INSERT INTO "concept" VALUES('normal_tissue','normal tissue','fibroglandular and fatty tissue without findings',1,7,'2026-11-26 00:40:06.420753');
INSERT INTO "concept" VALUES('background','background','outside the breast',1,8,'2026-11-26 00:40:06.420754');
INSERT INTO "concept" VALUES('pectoral_muscle','pectoral muscle','the pectoral muscle in MLO views',1,9,'2026-11-26 00:40:06.420755');
INSERT INTO "concept" VALUES('rim_sign','rim sign','',0,1000,'2025-01-02 10:00:00.000000');
CREATE TABLE image_mark (
	id INTEGER NOT NULL, 
	image_id VARCHAR(128) NOT NULL, 
	concept VARCHAR(64) NOT NULL, 
	present BOOLEAN NOT NULL, 
	author VARCHAR(200) NOT NULL, 
	created_at DATETIME NOT NULL, 
	CONSTRAINT pk_image_mark PRIMARY KEY (id), 
	CONSTRAINT uq_image_mark_image_id_concept UNIQUE (image_id, concept), 
	CONSTRAINT fk_image_mark_concept_concept FOREIGN KEY(concept) REFERENCES concept (id)
);
INSERT INTO "image_mark" VALUES(1,'p0003','mass',1,'Dr Bob Smith','2025-01-02 10:05:00.000000');
INSERT INTO "image_mark" VALUES(2,'p0004','mass',0,'carla','2025-01-02 10:06:00.000000');
CREATE TABLE label_action (
	id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	layer VARCHAR(200) NOT NULL, 
	concept VARCHAR(64), 
	image_id VARCHAR(128), 
	region_id INTEGER, 
	rule JSON NOT NULL, 
	author VARCHAR(200) NOT NULL, 
	created_at DATETIME NOT NULL, 
	n_changed INTEGER NOT NULL, 
	undoes INTEGER, 
	undone_by INTEGER, 
	CONSTRAINT pk_label_action PRIMARY KEY (id), 
	CONSTRAINT fk_label_action_concept_concept FOREIGN KEY(concept) REFERENCES concept (id), 
	CONSTRAINT fk_label_action_region_id_region FOREIGN KEY(region_id) REFERENCES region (id), 
	CONSTRAINT fk_label_action_undoes_label_action FOREIGN KEY(undoes) REFERENCES label_action (id), 
	CONSTRAINT fk_label_action_undone_by_label_action FOREIGN KEY(undone_by) REFERENCES label_action (id)
);
INSERT INTO "label_action" VALUES(1,'region','features.9','mass','p0001',1,'{"threshold": 0.2, "above_current": true, "level": 0.99}','ana','2025-01-02 10:01:00.000000',2,NULL,NULL);
INSERT INTO "label_action" VALUES(2,'manual','features.9','calcification',NULL,NULL,'{}','Dr Bob Smith','2025-01-02 10:02:00.000000',1,NULL,NULL);
INSERT INTO "label_action" VALUES(3,'region','features.9','calcification','p0002',2,'{"threshold": 0.2, "above_current": true, "level": 0.99}','ana','2025-01-02 10:03:00.000000',1,NULL,4);
INSERT INTO "label_action" VALUES(4,'undo','features.9','calcification','p0002',2,'{}','ana','2025-01-02 10:04:00.000000',1,3,NULL);
CREATE TABLE label_change (
	id INTEGER NOT NULL, 
	action_id INTEGER NOT NULL, 
	layer VARCHAR(200) NOT NULL, 
	unit INTEGER NOT NULL, 
	"before" JSON, 
	"after" JSON, 
	CONSTRAINT pk_label_change PRIMARY KEY (id), 
	CONSTRAINT fk_label_change_action_id_label_action FOREIGN KEY(action_id) REFERENCES label_action (id)
);
INSERT INTO "label_change" VALUES(1,1,'features.9',2,'null','{"concept": "mass", "iou": 0.5, "author": "ana", "created_at": "2025-01-02T10:01:00+00:00", "image_id": "p0001", "region_id": 1, "action_id": 1, "version": 1}');
INSERT INTO "label_change" VALUES(2,1,'features.9',3,'null','{"concept": "mass", "iou": 0.25, "author": "ana", "created_at": "2025-01-02T10:01:00+00:00", "image_id": "p0001", "region_id": 1, "action_id": 1, "version": 1}');
INSERT INTO "label_change" VALUES(3,2,'features.9',5,'null','{"concept": "calcification", "iou": null, "author": "Dr Bob Smith", "created_at": "2025-01-02T10:02:00+00:00", "image_id": null, "region_id": null, "action_id": 2, "version": 1}');
INSERT INTO "label_change" VALUES(4,3,'features.9',3,'{"concept": "mass", "iou": 0.25, "author": "ana", "created_at": "2025-01-02T10:01:00+00:00", "image_id": "p0001", "region_id": 1, "action_id": 1, "version": 1}','{"concept": "calcification", "iou": 0.6, "author": "ana", "created_at": "2025-01-02T10:03:00+00:00", "image_id": "p0002", "region_id": 2, "action_id": 3, "version": 2}');
INSERT INTO "label_change" VALUES(5,4,'features.9',3,'{"concept": "calcification", "iou": 0.6, "author": "ana", "created_at": "2025-01-02T10:03:00+00:00", "image_id": "p0002", "region_id": 2, "action_id": 3, "version": 2}','{"concept": "mass", "iou": 0.25, "author": "ana", "created_at": "2025-01-02T10:01:00+00:00", "image_id": "p0001", "region_id": 1, "action_id": 1, "version": 1}');
CREATE TABLE region (
	id INTEGER NOT NULL, 
	image_id VARCHAR(128) NOT NULL, 
	concept VARCHAR(64) NOT NULL, 
	spec JSON NOT NULL, 
	height INTEGER NOT NULL, 
	width INTEGER NOT NULL, 
	area INTEGER NOT NULL, 
	author VARCHAR(200) NOT NULL, 
	created_at DATETIME NOT NULL, 
	deleted_at DATETIME, 
	CONSTRAINT pk_region PRIMARY KEY (id), 
	CONSTRAINT fk_region_concept_concept FOREIGN KEY(concept) REFERENCES concept (id)
);
INSERT INTO "region" VALUES(1,'p0001','mass','[{"type": "rect", "x0": 8, "y0": 8, "x1": 40, "y1": 40}]',64,64,1024,'ana','2025-01-02 10:01:00.000000',NULL);
INSERT INTO "region" VALUES(2,'p0002','calcification','[{"type": "rect", "x0": 8, "y0": 8, "x1": 40, "y1": 40}]',64,64,1024,'ana','2025-01-02 10:03:00.000000','2025-01-02 10:04:00.000000');
CREATE TABLE schema_version (
	version INTEGER NOT NULL, 
	applied_at DATETIME NOT NULL, 
	note VARCHAR(200) NOT NULL, 
	CONSTRAINT pk_schema_version PRIMARY KEY (version)
);
INSERT INTO "schema_version" VALUES(1,'2026-11-26 00:40:06.421441','created');
CREATE TABLE unit_label (
	layer VARCHAR(200) NOT NULL, 
	unit INTEGER NOT NULL, 
	concept VARCHAR(64) NOT NULL, 
	iou FLOAT, 
	author VARCHAR(200) NOT NULL, 
	created_at DATETIME NOT NULL, 
	image_id VARCHAR(128), 
	region_id INTEGER, 
	action_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	CONSTRAINT pk_unit_label PRIMARY KEY (layer, unit), 
	CONSTRAINT fk_unit_label_concept_concept FOREIGN KEY(concept) REFERENCES concept (id), 
	CONSTRAINT fk_unit_label_region_id_region FOREIGN KEY(region_id) REFERENCES region (id), 
	CONSTRAINT fk_unit_label_action_id_label_action FOREIGN KEY(action_id) REFERENCES label_action (id)
);
INSERT INTO "unit_label" VALUES('features.9',2,'mass',0.5,'ana','2025-01-02 10:01:00.000000','p0001',1,1,1);
INSERT INTO "unit_label" VALUES('features.9',3,'mass',0.25,'ana','2025-01-02 10:01:00.000000','p0001',1,1,1);
INSERT INTO "unit_label" VALUES('features.9',5,'calcification',NULL,'Dr Bob Smith','2025-01-02 10:02:00.000000',NULL,NULL,2,1);
CREATE INDEX ix_region_image_id ON region (image_id);
CREATE INDEX ix_region_concept ON region (concept);
CREATE INDEX ix_image_mark_image_id ON image_mark (image_id);
CREATE INDEX ix_image_mark_concept ON image_mark (concept);
CREATE INDEX ix_label_action_layer ON label_action (layer);
CREATE INDEX ix_unit_label_concept ON unit_label (concept);
CREATE INDEX ix_label_change_layer_unit ON label_change (layer, unit);
CREATE INDEX ix_label_change_action_id ON label_change (action_id);
COMMIT;
